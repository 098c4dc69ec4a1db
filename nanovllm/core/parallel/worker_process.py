"""The loop of one tensor-parallel worker process (ranks 1..N-1), started with `spawn` by WorkerGroup.

A worker builds the same runner as rank 0 (its own shard of the weights and KV cache), then for each
step receives the packed inputs over its pipe, receives the final input_ids by broadcast (rank 0 may
have filled in tokens sampled by the step still in flight) and runs the forward pass; the LM head
gathers the logits on rank 0. An empty message, or rank 0's end of the pipe closing, ends the loop.
"""
import pickle
import signal
import traceback
from multiprocessing.connection import Connection

from nanovllm.core.config import EngineConfig
from nanovllm.core.startup import PinnedPlan


def worker_main(config: EngineConfig, spec: PinnedPlan, rank: int, world_size: int, init_method: str,
                conn: Connection) -> None:
    """`spec` is rank 0's resolved start-up: the worker runs the same backend and kernels, never resolving its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it shuts us down
    comm = None
    try:
        from nanovllm.core.model_runner import ModelRunner
        from nanovllm.core.parallel.step_transport import step_to_device, unpack_step
        from nanovllm.core.plugins import load_plugins
        from nanovllm.core.startup import from_pinned, with_verification

        plugins = load_plugins()
        resolved = with_verification(from_pinned(spec, plugins), plugins, config.verify_kernels)
        comm = resolved.backend.communicator(rank, world_size, init_method)
        runner = ModelRunner(config, resolved, comm)
        runner.initialize()
        while True:
            try:
                payload = conn.recv_bytes()
            except EOFError:  # rank 0 is gone
                break
            if not payload:
                break
            input_ids, positions, meta = step_to_device(unpack_step(payload), runner.device)
            comm.broadcast(input_ids)
            runner.execute(input_ids, positions, meta)
    except BaseException:
        try:
            conn.send_bytes(pickle.dumps(traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        if comm is not None:
            comm.close()
