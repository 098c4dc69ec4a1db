"""The model used when none is named. Until a real embedded model lands, a small random Qwen3 built
on the spot (its output is gibberish: it shows the engine working, not a language model)."""
import os

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)


def cache_dir() -> str:
    base = os.environ.get("NANOVLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanovllm")
    return base


def default_model_path() -> str:
    from nanovllm.testing.tiny_models import make_tiny_model
    path = os.path.join(cache_dir(), "tiny-random-qwen3")
    if not os.path.isfile(os.path.join(path, "config.json")):
        logger.info("building a small random Qwen3 in %s (no model download needed)", path)
    return make_tiny_model(path, "qwen3")
