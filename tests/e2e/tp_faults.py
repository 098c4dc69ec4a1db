"""Worker entry points that fail on purpose, for the tensor-parallel fault tests (importable by spawned children)."""
import dataclasses

from nanovllm.core.parallel.worker_process import worker_main


def fails_before_the_rendezvous(config, spec, rank, world_size, init_method, conn):
    """The worker's own start-up raises (it cannot find rank 0's backend) while rank 0 waits to rendezvous."""
    spec = dataclasses.replace(spec, backend="backend_of_rank_1_that_does_not_exist")
    worker_main(config, spec, rank, world_size, init_method, conn)


def exits_before_starting(config, spec, rank, world_size, init_method, conn):
    """Dies before any nanovllm code runs, as a worker does when the main script lacks its __main__ guard."""
    raise SystemExit(3)
