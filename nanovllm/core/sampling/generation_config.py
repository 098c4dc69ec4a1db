"""A model folder's generation_config.json: default sampling settings and extra EOS ids, as vLLM reads them.

`LLM(..., generation_config="auto")` (the default) reads the model folder's file, a folder path reads that
folder's, and "none" ignores it. Its temperature, top_p, top_k, min_p and repetition_penalty become the defaults
of SamplingParams fields a request leaves unset; its eos_token_id joins the model config's EOS ids.
"""
import json
import os

from nanovllm.sampling_params import MODEL_DEFAULTS, SamplingParams

FILE_NAME = "generation_config.json"


def read_generation_config(model: str, setting: str) -> tuple[dict, set[int]]:
    """(defaults for unset SamplingParams fields, EOS ids) from `setting` ("auto", "none" or a folder)."""
    if setting == "none":
        return {}, set()
    folder = model if setting == "auto" else os.path.expanduser(setting)
    path = os.path.join(folder, FILE_NAME)
    if not os.path.isfile(path):
        if setting != "auto":
            raise FileNotFoundError(f"generation_config={setting!r} has no {FILE_NAME}; pass 'auto' (the model "
                                    f"folder's), 'none', or a folder holding one")
        return {}, set()
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e} (fix the file, or pass generation_config='none')") from None
    defaults = {name: values[name] for name in MODEL_DEFAULTS if values.get(name) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{path} holds an invalid default: {e} (fix the file, or pass "
                         f"generation_config='none')") from None
    eos = values.get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
    return defaults, eos_ids
