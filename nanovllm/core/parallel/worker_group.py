"""WorkerGroup: rank 0's handle on the tensor-parallel worker processes (one per extra rank).

It spawns them, sends each step's packed inputs down one pipe per worker, watches them from a daemon
thread so a worker that dies becomes a RuntimeError on rank 0, and shuts them down on close(), at
interpreter exit, or after a failed step. Nothing here uses shared memory, so nothing can leak there.
"""
import atexit
import multiprocessing as mp
import pickle
import socket
import threading
from multiprocessing.connection import wait

from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.parallel.worker_process import worker_main
from nanovllm.core.startup import PinnedPlan

logger = get_logger(__name__)

DEATH_NOTICE_SECONDS = 3.0  # how long a failed collective waits to learn whether a worker died


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    def __init__(self, config: EngineConfig, spec: PinnedPlan, world_size: int):
        """`spec`: rank 0's resolved backend and kernels, which every worker runs."""
        self.init_method = f"tcp://127.0.0.1:{free_local_port()}"
        self.failure: str | None = None  # written only by the monitor thread, then `died` is set
        self.died = threading.Event()
        self.closed = False
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            for rank in range(1, world_size):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=worker_main, name=f"nanovllm-tp-rank{rank}", daemon=True,
                                   args=(config, spec, rank, world_size, self.init_method, child_end))
                self.conns.append(parent_end)
                proc.start()
                child_end.close()
                self.procs.append(proc)
        except BaseException:
            for proc in self.procs:
                proc.kill()
                proc.join()
            raise
        atexit.register(self.close, False)
        self.monitor = threading.Thread(target=self._watch, name="nanovllm-tp-monitor", daemon=True)
        self.monitor.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _watch(self) -> None:
        alive = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        while alive and not self.closed:
            for sentinel in wait(list(alive), timeout=0.5):
                rank = alive.pop(sentinel)
                if not self.closed and self.failure is None:
                    self.failure = self._describe_death(rank)
                    logger.error("%s", self.failure)
                    self.died.set()

    def _describe_death(self, rank: int) -> str:
        proc, conn = self.procs[rank - 1], self.conns[rank - 1]
        proc.join(timeout=1)
        why = ""
        try:
            if conn.poll(0.2):
                why = ":\n" + pickle.loads(conn.recv_bytes())
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        return (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}{why}\n"
                f"the engine cannot continue; create a new LLM (and check the machine's memory and logs)")

    def check(self) -> None:
        """Raise RuntimeError if a worker has died or the group is shut down."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        if self.closed:
            raise RuntimeError("the tensor-parallel workers are shut down (close() was called or a step failed); "
                               "create a new LLM")

    def death_error(self, error: BaseException) -> RuntimeError | None:
        """After `error` in a step: a RuntimeError naming the worker that died, or None if none did.

        A collective fails the moment a peer's connection drops, which can be just before the peer's exit
        is visible, so this waits briefly for one. Only errors a lost peer can cause (RuntimeError from a
        collective, OSError from a pipe) are considered; a ValueError every rank raised stays itself.
        """
        if not isinstance(error, (RuntimeError, OSError)):
            return None
        if not self.closed:
            self.died.wait(timeout=DEATH_NOTICE_SECONDS)
        return RuntimeError(self.failure) if self.failure is not None else None

    def send_step(self, payload: bytes) -> None:
        self.check()
        for conn in self.conns:
            conn.send_bytes(payload)

    def close(self, graceful: bool = True) -> None:
        """Stop every worker: ask them to exit (graceful), else or then terminate and kill. Idempotent."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if graceful:
            for conn in self.conns:
                try:
                    conn.send_bytes(b"")
                except OSError:
                    pass
            for proc in self.procs:
                proc.join(timeout=5)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.monitor.join(timeout=2)
        for conn in self.conns:
            conn.close()
