"""TorchDistCommunicator: the Communicator over torch.distributed (gloo on CPU, nccl on CUDA).

Device-agnostic: the backend passes the torch.distributed backend name and the rank's device. One
engine per process: it owns the process's default group, which it creates and destroys.
"""
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.core.parallel.communicator import Communicator

# How long a collective waits for a peer. A peer that crashes closes its connection and is noticed at
# once (gloo); the timeout only bounds a peer that hangs or never joins.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


class TorchDistCommunicator(Communicator):
    def __init__(self, rank: int, world_size: int, init_method: str, backend_name: str, device: torch.device,
                 timeout: timedelta = COLLECTIVE_TIMEOUT):
        super().__init__(rank, world_size)
        if not dist.is_available():
            raise RuntimeError("this build of torch has no torch.distributed; use tensor_parallel_size=1")
        self.device = device
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process; run one tensor-parallel "
                               "engine per process (call close() on the other LLM first)")
        dist.init_process_group(backend_name, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
        self.group = dist.group.WORLD
        self.open = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def gather(self, x: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(x, parts, dst=dst, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=src, group=self.group)
        return x

    def close(self) -> None:
        if self.open:
            self.open = False
            dist.destroy_process_group()
