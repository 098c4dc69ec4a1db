"""Ray is optional: imported only where it is used, with an error that says how to install it."""
import importlib


def require_ray():
    """The `ray` module with Ray Data loaded; RuntimeError naming the extra that installs it when absent."""
    try:
        ray = importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError as e:
        raise RuntimeError(f"nanovllm's Ray integration needs Ray Data ({e}); install it with "
                           f"pip install 'nanovllm[ray]' (or pip install 'ray[data]')") from None
    return ray
