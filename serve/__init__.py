"""`cbt-llm serve`: an OpenAI-compatible chat server (FastAPI + uvicorn) with the crisis guard on every request."""
