import contextlib
import logging
import os

import pytest
import torch

from nanovllm.core.logging import get_logger
from nanovllm.testing.tiny_models import make_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3")), "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2")


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
