"""Getting a checkpoint: checking a model folder, and the embedded default model (GGUF converted once)."""
