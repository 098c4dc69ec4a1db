"""Everything between a step's logits and its token ids, beside the plan's `sampler` kernel: per-row sampling
tensors and the host copy (`step_sampler.py`), penalties, biases and masks (`logits_processing.py`),
structured-output bitmasks (`structured.py`), logprobs of outputs and prompts (`logprobs.py`,
`prompt_logprobs.py`), and a model folder's sampling defaults (`generation_config.py`)."""
