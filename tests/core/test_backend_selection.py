"""Backend selection asks a named backend about the engine's device option; auto-selection does not."""
import pytest
import torch

from nanovllm.core.backend import Backend
from nanovllm.core.plugins import Plugins


class HostTestableBackend(Backend):
    """A null backend like mps: its own device is missing here, but it can run on CPU tensors."""
    name = "gpu_like"
    device_type = "gpu_like"
    default_dtype = torch.float16

    def availability(self, device=None):
        return (True, "") if device == "cpu" else (False, "no such device here")

    def default_dtype_for(self, device):
        return torch.float32 if device.type == "cpu" else self.default_dtype


class Always(Backend):
    name = "always"


def plugins() -> Plugins:
    return Plugins(backends={"gpu_like": HostTestableBackend(), "always": Always()},
                   settings={"backends": {"order": ["gpu_like", "always"]}})


def test_named_backend_is_asked_about_the_device_option():
    assert plugins().select("gpu_like", "cpu").name == "gpu_like"
    with pytest.raises(RuntimeError, match="'gpu_like' is not available on this machine: no such device here") as e:
        plugins().select("gpu_like")
    assert "always (available)" in str(e.value)


def test_auto_selection_ignores_the_device_option():
    assert plugins().select(None, "cpu").name == "always"


def test_default_dtype_may_depend_on_the_device():
    backend = HostTestableBackend()
    assert backend.default_dtype_for(torch.device("cpu")) == torch.float32
    assert Always().default_dtype_for(torch.device("cpu")) == Backend.default_dtype
