"""Tensor-parallel collectives as the core sees them; backends supply the implementation."""
import torch


class Communicator:
    """Collectives over the ranks of one engine. The single-rank version is the identity."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dim on rank `dst` (others get None)."""
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return x

    def close(self) -> None:
        pass
