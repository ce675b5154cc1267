"""`python -m cbt_llm.cli ...`: what torchrun and the rendered launcher scripts run on every rank."""

import sys

from cbt_llm.cli import main

sys.exit(main())
