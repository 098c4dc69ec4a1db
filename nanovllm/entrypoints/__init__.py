"""Front doors to the engine beyond the Python API: the OpenAI-compatible HTTP server (`nanovllm serve`)."""
