"""Built-in backends. Each is a plugin found through the `nanovllm.backends` entry points, like any other."""
