"""cbt-llm: build CBT-LLM style models end to end."""

__version__ = "0.1.0"
