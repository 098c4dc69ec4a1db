"""How many compiled variants each of the cuda backend's Triton kernels holds. A kernel that meets a new
specialisation during a run (an integer argument that is 1 or a multiple of 16 for the first time, a new
constexpr) compiles then, or loads from Triton's disk cache, and stalls that step: start-up's warm-ups and graph
captures are meant to compile everything. Tests compare the counts before and after a run;
`benchmarks/profile_steps.py --first-times` names the steps where they changed."""
import importlib
import pkgutil

_KERNELS: list = []  # (qualified name, JITFunction), found once


def _kernels() -> list:
    if not _KERNELS:
        from triton.runtime.jit import JITFunction
        import nanovllm.backends.cuda as package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            short = info.name.removeprefix(package.__name__ + ".")
            _KERNELS.extend((f"{short}.{attr}", fn) for attr, fn in vars(module).items()
                            if isinstance(fn, JITFunction) and getattr(fn, "__module__", info.name) == info.name)
    return _KERNELS


def compiled_variants() -> dict[str, int]:
    """Kernel name -> compiled variants in Triton's per-device cache (every kernel of the backend's modules)."""
    counts = {}
    for name, fn in _kernels():
        if hasattr(fn, "device_caches"):  # Triton >= 3.2: device -> (kernel cache, ...)
            counts[name] = sum(len(cache[0]) for cache in fn.device_caches.values())
        else:  # older: device -> {key: kernel}
            counts[name] = sum(len(cache) for cache in fn.cache.values())
    return counts
