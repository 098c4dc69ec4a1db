"""Tensor parallelism: the communicator interface, its torch.distributed implementation, the size checks,
the worker processes and how a step travels to them."""
