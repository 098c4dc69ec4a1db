"""The loop of one tensor-parallel worker process (ranks 1..N-1), started with `spawn` by WorkerGroup.

A worker builds the same runner as rank 0 (its own shard of the weights and KV cache), then for each
step receives the packed inputs over its pipe, receives the final input_ids by broadcast (rank 0 may
have filled in tokens sampled by the step still in flight) and runs the forward pass; the LM head
gathers the logits on rank 0. An empty message, or rank 0's end of the pipe closing, ends the loop.
Meanwhile it reports to rank 0 over the same pipe (see Reporter): started, heartbeats, its traceback.
"""
import pickle
import signal
import threading
import traceback
from multiprocessing.connection import Connection

from nanovllm.core.config import EngineConfig
from nanovllm.core.startup import PinnedPlan


def worker_main(config: EngineConfig, spec: PinnedPlan, rank: int, world_size: int, init_method: str,
                conn: Connection) -> None:
    """`spec` is rank 0's resolved start-up: the worker runs the same backend and kernels, never resolving its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it shuts us down
    report = Reporter(conn)
    comm = None
    try:
        from nanovllm.core.gc_freeze import START_UP_FREEZE
        from nanovllm.core.model_runner import ModelRunner
        from nanovllm.core.runner_setup import set_up
        from nanovllm.core.parallel.step_transport import step_to_device, unpack_step
        from nanovllm.core.plugins import load_plugins
        from nanovllm.core.startup import from_pinned, with_verification

        plugins = load_plugins()
        resolved = with_verification(from_pinned(spec, plugins), plugins, config.verify_kernels)
        report.ready()
        comm = resolved.backend.communicator(rank, world_size, init_method)
        runner = ModelRunner(config, resolved, comm)
        set_up(runner)
        START_UP_FREEZE.freeze()  # as rank 0's engine: no full collection of start-up's objects inside a step
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
        report.send(pickle.dumps(traceback.format_exc()))
        raise SystemExit(1)
    finally:
        report.stop()
        if comm is not None:
            comm.close()


class Reporter:
    """The worker's messages to rank 0 over its pipe: "started" at once, then a heartbeat every HEARTBEAT_SECONDS
    from a daemon thread (it stops when this process is stopped or hung, which rank 0 notices), and the
    traceback if the worker fails. Sends are serialised: two threads share the pipe."""

    def __init__(self, conn: Connection):
        from nanovllm.core.parallel.worker_group import HEARTBEAT_SECONDS, MESSAGE_HEARTBEAT, MESSAGE_STARTED
        self.conn, self.lock, self.done = conn, threading.Lock(), threading.Event()
        self.send(MESSAGE_STARTED)

        def beat():
            while not self.done.wait(HEARTBEAT_SECONDS):
                self.send(MESSAGE_HEARTBEAT)

        threading.Thread(target=beat, name="nanovllm-tp-heartbeat", daemon=True).start()

    def send(self, message: bytes) -> None:
        with self.lock:
            try:
                self.conn.send_bytes(message)
            except OSError:
                pass

    def ready(self) -> None:
        """About to join the rendezvous (rank 0 joins once every worker has said so)."""
        from nanovllm.core.parallel.worker_group import MESSAGE_READY
        self.send(MESSAGE_READY)

    def stop(self) -> None:
        self.done.set()
