"""The project's one logger. Its level comes from NANOVLLM_LOG_LEVEL (default INFO)."""
import logging
import os

_ROOT = "nanovllm"


def _configure() -> logging.Logger:
    logger = logging.getLogger(_ROOT)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    level = os.environ.get("NANOVLLM_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(f"NANOVLLM_LOG_LEVEL={level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")
    logger.setLevel(level)
    return logger


_configure()


def get_logger(name: str) -> logging.Logger:
    """A child of the project logger, e.g. get_logger(__name__)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
