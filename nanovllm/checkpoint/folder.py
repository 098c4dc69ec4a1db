"""The model folder: checked and read before anything is loaded, with an error naming the file and the fix."""
import glob
import math
import os
import re

from transformers import AutoConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(path: str) -> None:
    """FileNotFoundError unless `path` is a folder holding a config.json."""
    if os.path.isfile(path):
        raise FileNotFoundError(f"model {path!r} is a file, not a folder; pass the Hugging Face checkpoint folder "
                                f"that holds it")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist; pass the path of a Hugging Face "
                                f"checkpoint folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face checkpoint folder")


def config_folder(model: str | None, config: str | None) -> str:
    """The folder whose config.json gives a command's shapes: `--model`, else `--config` (a config.json or its
    folder). FileNotFoundError when it has no config.json; ValueError when neither is given."""
    source = model or config
    if source is None:
        raise ValueError("give --model (a checkpoint folder) or --config (a config.json, or its folder)")
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{source!r} has no config.json; pass a checkpoint folder or its config.json")
    return folder


def read_hf_config(path: str):
    """The folder's config.json through transformers; ValueError naming the file when it cannot be read."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read {os.path.join(path, 'config.json')}: {e} (re-download the checkpoint, or "
                         f"fix config.json: it needs a model_type transformers knows and an 'architectures' "
                         f"list)") from e


def check_tokenizer_folder(path: str) -> None:
    """FileNotFoundError when a local tokenizer folder has no tokenizer file: transformers would otherwise build
    an empty tokenizer without a word."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); pass tokenizer=<folder "
                                f"with one>, or skip_tokenizer_init=True to give prompts as token ids")


POSITIVE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                   "intermediate_size", "max_position_embeddings", "vocab_size")


def check_hf_config(path: str, hf_config, weights: bool = True) -> None:
    """ValueError naming config.json and the field when a size cannot describe a model, or (with `weights`)
    disagrees with the checkpoint's tensors: checked before anything is allocated, so a config of a million
    layers is refused at once rather than after minutes of allocation."""
    where = os.path.join(path, "config.json")

    def refuse(field: str, value, expected: str):
        raise ValueError(f"{where}: {field}={value!r} is invalid: {expected}; fix config.json or re-download the "
                         f"checkpoint")

    for field in POSITIVE_FIELDS:
        value = getattr(hf_config, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(field, value, "expected an integer >= 1")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        refuse("head_dim", head_dim, "expected an integer >= 1")
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % kv_heads:
        refuse("num_key_value_heads", kv_heads, f"expected a divisor of num_attention_heads={heads}")
    if head_dim is None and hf_config.hidden_size % heads:
        refuse("hidden_size", hf_config.hidden_size, f"expected a multiple of num_attention_heads={heads} "
                                                     f"(or set head_dim)")
    for field in ("rms_norm_eps", "rope_theta"):
        value = getattr(hf_config, field, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0 or (field == "rope_theta" and not value)):
            refuse(field, value, "expected a finite number >= 0" if field == "rms_norm_eps" else "expected a number > 0")
    if weights:
        check_against_checkpoint(path, hf_config)


def check_against_checkpoint(path: str, hf_config) -> None:
    """The layer count and the embedding's shape in config.json against the safetensors headers (no tensor is
    read). Unreadable or missing weights are left to the loader, which names the file."""
    names, embedding = checkpoint_layout(path)
    if not names:
        return
    layers = {int(m.group(1)) for m in map(LAYER.match, names) if m}
    where = os.path.join(path, "config.json")
    if layers and hf_config.num_hidden_layers != max(layers) + 1:
        raise ValueError(f"{where}: num_hidden_layers={hf_config.num_hidden_layers} is invalid: the weights hold "
                         f"{max(layers) + 1} layers (model.layers.0-{max(layers)}); fix config.json or re-download "
                         f"the checkpoint")
    if embedding is not None and len(embedding) == 2:
        for field, size, axis in (("vocab_size", hf_config.vocab_size, "rows"),
                                  ("hidden_size", hf_config.hidden_size, "columns")):
            actual = embedding[0] if axis == "rows" else embedding[1]
            if size != actual:
                raise ValueError(f"{where}: {field}={size} is invalid: model.embed_tokens.weight has {actual} "
                                 f"{axis} (shape {list(embedding)}); fix config.json or re-download the checkpoint")


LAYER = re.compile(r"model\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens.weight"


def checkpoint_layout(path: str) -> tuple[list[str], tuple[int, ...] | None]:
    """(tensor names, the embedding's shape) from the weights' headers; ([], None) when they cannot be read."""
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    names, embedding = [], None
    try:
        for file in files:
            with safe_open(file, "pt", "cpu") as f:
                keys = list(f.keys())
                names += keys
                if EMBEDDING in keys:
                    embedding = tuple(f.get_slice(EMBEDDING).get_shape())
    except Exception:  # a truncated or corrupt file: the loader reports it with the file's name
        return [], None
    return names, embedding
