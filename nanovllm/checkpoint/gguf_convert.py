"""Convert a GGUF checkpoint into a Hugging Face folder: model.safetensors, config.json, tokenizer files.

transformers dequantises GGUF tensors on load (through the `gguf` package, with `accelerate`) but refuses
`save_pretrained` on such a model, so the state dict, config and tokenizer are written here.
"""
import importlib.util
import os

import torch

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

GGUF_DEPENDENCIES = ("gguf", "accelerate")


def convert_gguf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantise `gguf_path` with transformers and write it to the existing folder `out_dir` in `dtype`."""
    missing = [name for name in GGUF_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"reading a GGUF file needs the packages {', '.join(missing)}; "
                           f"install them with `pip install {' '.join(GGUF_DEPENDENCIES)}`")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    logger.info("reading the tokenizer of %s", name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    logger.info("dequantising the weights of %s (tens of seconds on a small CPU)", name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    state = {key: tensor.to(dtype).contiguous() for key, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares the embedding's storage; safetensors stores it once
    weights = os.path.join(out_dir, "model.safetensors")
    logger.info("writing %d tensors (%.0f MB, %s) to %s", len(state),
                sum(t.numel() * t.element_size() for t in state.values()) / 1e6, dtype, weights)
    save_file(state, weights, metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]  # GGUF-loaded configs leave it empty
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder holds plain tensors now
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)  # renamed in transformers 4.56
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
