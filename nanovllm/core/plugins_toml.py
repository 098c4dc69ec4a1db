"""plugins.toml: read, checked against its schema, and the names it uses checked against what loaded.

Every wrong type is a ValueError naming the file, the key and the type expected; a name the file uses that no
plugin offers (a backend, an op, a kernel) is a warning, since the plugin may simply not be installed here.
"""
from pathlib import Path

from nanovllm.core.logging import get_logger
from nanovllm.core.toml import tomllib

logger = get_logger(__name__)

LIST_OF_STRINGS = "a list of strings"
# [backends]: key -> what each names
BACKENDS_KEYS = {"order": "backend names, auto-selection order", "disabled": "entry-point names not to load",
                 "disabled_kernels": '"backend/kernel" names never to choose'}
TUNE_KEYS = {"date": str, "device": str, "ops": list}


def read_toml(path: Path) -> dict:
    """The file's tables; ValueError naming the file when it is a folder, unreadable, binary or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a plugins.toml file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (not UTF-8): is it the plugins.toml you meant? Fix or delete "
                         f"it") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e}); fix or delete it") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror or e}") from None


def type_name(value) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def check_schema(data: dict, path: Path) -> dict:
    """`data` unchanged if it fits the schema; ValueError naming the file, key and expected type otherwise."""
    def refuse(key: str, value, expected: str):
        raise ValueError(f"{path}: {key} is {type_name(value)} ({value!r}), expected {expected}")

    def strings(key: str, value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            refuse(key, value, LIST_OF_STRINGS + ' (e.g. ["a", "b"])')

    for key in sorted(set(data) - {"backends", "kernels", "tune"}):
        logger.warning("%s: unknown table or key %r is ignored (known: backends, kernels, tune)", path, key)
    backends = data.get("backends", {})
    if not isinstance(backends, dict):
        refuse("backends", backends, "a table ([backends])")
    for key, value in backends.items():
        if key in BACKENDS_KEYS:
            strings(f"[backends] {key}", value)
        else:
            logger.warning("%s: unknown key %r in [backends] is ignored (known: %s)", path, key,
                           ", ".join(BACKENDS_KEYS))
    kernels = data.get("kernels", {})
    if not isinstance(kernels, dict):
        refuse("kernels", kernels, "a table of [kernels.<backend>] tables")
    for backend, prefs in kernels.items():
        if not isinstance(prefs, dict):
            refuse(f"[kernels] {backend}", prefs, f'a table [kernels.{backend}] of op = ["kernel", ...]')
        for op, names in prefs.items():
            strings(f"[kernels.{backend}] {op!r}", names)
    tune = data.get("tune", {})
    if not isinstance(tune, dict) or not all(isinstance(t, dict) for t in tune.values()):
        refuse("tune", tune, "[tune.<backend>] tables (written by `nanovllm tune`)")
    for backend, table in tune.items():
        for key, kind in TUNE_KEYS.items():
            if key in table and not isinstance(table[key], kind):
                refuse(f"[tune.{backend}] {key}", table[key], "a string" if kind is str else LIST_OF_STRINGS)
    return data


def warn_unknown_names(settings: dict, backends: set[str], plugin_names: set[str], registry) -> None:
    """Warn for each backend, op or kernel the settings name that nothing loaded offers (a typo, or a plugin not
    installed here); the setting is then without effect."""
    from nanovllm.core.registry import OPS
    where = settings.get("_source", "plugins.toml")
    known_backends = backends | {i.backend for impls in registry.impls.values() for i in impls}
    section = settings.get("backends", {})
    for name in section.get("order", []):
        if name not in known_backends:
            logger.warning("%s: [backends] order names %r, which no loaded plugin offers", where, name)
    for name in section.get("disabled", []):
        if name not in plugin_names:
            logger.warning("%s: [backends] disabled names %r, which is no installed plugin", where, name)
    for full in section.get("disabled_kernels", []):
        backend, _, name = full.partition("/")
        if not any(i.backend == backend and i.name == name for impls in registry.impls.values() for i in impls):
            logger.warning("%s: [backends] disabled_kernels names %r, which no plugin registers (expected "
                           "\"backend/kernel\")", where, full)
    for backend, prefs in settings.get("kernels", {}).items():
        if backend not in known_backends:
            logger.warning("%s: [kernels.%s]: no loaded plugin offers backend %r", where, backend, backend)
            continue
        for op, names in prefs.items():
            if op not in OPS:
                logger.warning("%s: [kernels.%s] names unknown op %r (known: %s)", where, backend, op, ", ".join(OPS))
                continue
            for name in names:
                owner, _, short = name.rpartition("/")
                if not any(i.name == short and i.backend == (owner or backend) for i in registry.impls[op]):
                    logger.warning("%s: [kernels.%s] %r names kernel %r, which no plugin registers for %s", where,
                                   backend, op, name, owner or backend)
