"""The model folder: checked and read before anything is loaded, with an error naming the file and the fix."""
import os

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
