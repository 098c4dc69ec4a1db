"""LayerContext: what layers need from the engine (their rank's communicator and the resolved kernels)."""
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nanovllm.core.parallel.communicator import Communicator


@dataclass(frozen=True)
class LayerContext:
    comm: Communicator
    kernels: Mapping[str, Callable] = field(default_factory=dict)  # op name -> the function the plan chose
    kernel_label: Callable[[str], str] = str  # op name -> words naming its kernel and plugin, for errors

    @property
    def tp_rank(self) -> int:
        return self.comm.rank

    @property
    def tp_size(self) -> int:
        return self.comm.world_size
