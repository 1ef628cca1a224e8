"""The HTTP API of tokenrelay (FastAPI)."""
