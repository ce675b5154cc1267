"""The config tree under its first name, kept so that users' scripts (`from cbt_llm.config import load_config`)
keep working; the project itself imports cbt_llm.core.config."""

from cbt_llm.core.config import *  # noqa: F403
from cbt_llm.core.config import __all__  # noqa: F401
