"""The arq worker: generation jobs and the LLM providers they stream from."""
