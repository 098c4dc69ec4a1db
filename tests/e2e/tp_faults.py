"""Worker entry points that fail on purpose, for the tensor-parallel fault tests (importable by spawned children)."""
from nanovllm.core.worker import worker_main


def fails_before_the_rendezvous(config, backend_name, rank, world_size, init_method, conn):
    """The worker's own start-up raises (its backend cannot be resolved) while rank 0 waits to rendezvous."""
    worker_main(config, "backend_of_rank_1_that_does_not_exist", rank, world_size, init_method, conn)


def exits_before_starting(config, backend_name, rank, world_size, init_method, conn):
    """Dies before any nanovllm code runs, as a worker does when the main script lacks its __main__ guard."""
    raise SystemExit(3)
