"""LayerContext: what layers need from the engine (their rank's communicator and the resolved kernels)."""
from dataclasses import dataclass

from nanovllm.core.parallel.communicator import Communicator
from nanovllm.core.registry import KernelPlan


@dataclass(frozen=True)
class LayerContext:
    comm: Communicator
    kernels: KernelPlan | None = None

    @property
    def tp_rank(self) -> int:
        return self.comm.rank

    @property
    def tp_size(self) -> int:
        return self.comm.world_size
