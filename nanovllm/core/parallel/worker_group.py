"""WorkerGroup: rank 0's handle on the tensor-parallel worker processes (one per extra rank).

It spawns them, sends each step's packed inputs down one pipe per worker, and watches them from a daemon
thread: each worker reports that it started, sends a heartbeat every HEARTBEAT_SECONDS and, when it fails,
its traceback. Everything on rank 0 that can block on a worker (the start-up rendezvous, each step's
collectives) runs through `watch`, which waits in short slices: a worker that died (with its own error), one
whose heartbeat stopped (SIGSTOP, a hang) or Ctrl-C ends the wait within seconds, not at the collective's
timeout. Workers are shut down on close(), at interpreter exit, or after a failed step. Nothing here uses
shared memory, so nothing can leak there.
"""
import atexit
import concurrent.futures
import multiprocessing as mp
import os
import pickle
import re
import socket
import sys
import threading
import time
from multiprocessing.connection import wait

from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.parallel.worker_process import worker_main
from nanovllm.core.startup import PinnedPlan

logger = get_logger(__name__)

DEATH_NOTICE_SECONDS = 3.0  # how long a failed collective waits to learn whether a worker died
HEARTBEAT_SECONDS = 0.5  # how often a worker says it is alive (worker.py)
STARTUP_SECONDS = 120.0  # how long a spawned worker may take to start running nanovllm code
# worker -> rank 0: started, about to rendezvous, alive; anything else is a pickled traceback
MESSAGE_STARTED, MESSAGE_READY, MESSAGE_HEARTBEAT = b"started", b"ready", b"."
MAIN_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__""")


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a worker counts as stopped or hung (NANOVLLM_TP_HEARTBEAT_TIMEOUT)."""
    value = os.environ.get("NANOVLLM_TP_HEARTBEAT_TIMEOUT", "10")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"NANOVLLM_TP_HEARTBEAT_TIMEOUT={value!r} is invalid: expected a number of seconds > 0")
    return seconds


class WorkerFailure(RuntimeError):
    """A worker died or stopped answering; the message says which and why."""


GUARD_FIX = ('put the code that creates the LLM (and calls it) under `if __name__ == "__main__":` — worker '
             "processes are started with multiprocessing's 'spawn', which runs the top level of the main script "
             "again in each worker")


def check_main_guard(world_size: int) -> None:
    """RuntimeError before any spawn when the main script has no `if __name__ == "__main__":` guard: each
    worker would run the script's top level again, create an LLM of its own and die while starting."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py"):
        return  # an interactive session, python -c, a notebook: nothing is re-run
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return
    if not MAIN_GUARD.search(source):
        raise RuntimeError(f"tensor_parallel_size={world_size}: the script {path} has no "
                           f'`if __name__ == "__main__":` guard; {GUARD_FIX}')


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    def __init__(self, config: EngineConfig, spec: PinnedPlan, world_size: int):
        """`spec`: rank 0's resolved backend and kernels, which every worker runs."""
        check_main_guard(world_size)
        self.init_method = f"tcp://127.0.0.1:{free_local_port()}"
        self.failure: str | None = None  # written only by the monitor thread, then `died` is set
        self.died = threading.Event()
        self.closed = False
        self.started: set[int] = set()  # ranks whose worker_main runs
        self.ready: set[int] = set()  # ranks about to join the rendezvous
        self.tracebacks: dict[int, str] = {}
        self.last_seen = {rank: time.monotonic() for rank in range(1, world_size)}
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nanovllm-tp-rank0")
        self.inflight: concurrent.futures.Future | None = None
        self.interrupted = threading.Event()  # a caller's Ctrl-C, for the wait in progress (see interrupt)
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
        reports = {conn: rank for rank, conn in enumerate(self.conns, start=1)}
        last_loop = time.monotonic()
        while alive and not self.closed:
            ready = wait(list(reports) + list(alive), timeout=HEARTBEAT_SECONDS)
            now = time.monotonic()
            if now - last_loop > 2 * HEARTBEAT_SECONDS + 1:  # this process was stopped: no worker is to blame
                self.last_seen = dict.fromkeys(self.last_seen, now)
            last_loop = now
            for conn in [r for r in ready if r in reports]:
                self._read_report(conn, reports, now)
            for sentinel in [r for r in ready if r in alive]:
                rank = alive.pop(sentinel)
                conn = self.conns[rank - 1]
                while conn in reports and conn.poll(0.2):  # its last words, if still unread
                    self._read_report(conn, reports, now)
                if not self.closed and self.failure is None:
                    self.failure = self._describe_death(rank)
                    logger.error("%s", self.failure)
                    self.died.set()

    def _read_report(self, conn, reports: dict, now: float) -> None:
        rank = reports[conn]
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            del reports[conn]
            return
        if message == MESSAGE_HEARTBEAT:
            self.last_seen[rank] = now
        elif message in (MESSAGE_STARTED, MESSAGE_READY):
            (self.started if message == MESSAGE_STARTED else self.ready).add(rank)
            self.last_seen[rank] = now
        else:
            try:
                self.tracebacks[rank] = pickle.loads(message)
            except Exception:
                self.tracebacks[rank] = repr(message[:200])

    def _describe_death(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        proc.join(timeout=1)
        why = f":\n{self.tracebacks[rank]}" if rank in self.tracebacks else ""
        if rank not in self.started:
            why += (f"\nit died while starting, before running any nanovllm code (see its output above); the usual "
                    f"cause: {GUARD_FIX}")
        return (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}{why}\n"
                f"the engine cannot continue; create a new LLM (and check the machine's memory and logs)")

    def interrupt(self) -> None:
        """Make the wait in progress (if any) raise KeyboardInterrupt: a caller pressed Ctrl-C while the engine, on
        its own thread, waits on the workers (which shuts them down). Safe from any thread."""
        if self.inflight is not None and not self.inflight.done():
            self.interrupted.set()

    def stalled(self, timeout: float) -> str | None:
        """Why a worker counts as stopped or hung (no heartbeat for `timeout` seconds), or None."""
        now = time.monotonic()
        for rank, seen in self.last_seen.items():
            # before its first message a worker may still be importing torch on a busy machine: more time
            if now - seen > (timeout if rank in self.started else max(timeout, STARTUP_SECONDS)):
                pid = self.procs[rank - 1].pid
                return (f"tensor-parallel worker rank {rank} (pid {pid}) has sent no heartbeat for {now - seen:.0f} s: "
                        f"it is stopped (SIGSTOP, a debugger) or hung; the engine cannot continue; create a new "
                        f"LLM (NANOVLLM_TP_HEARTBEAT_TIMEOUT={timeout:g} sets this limit)")
        return None

    def wait_until_ready(self) -> None:
        """Return once every worker is about to join the rendezvous; WorkerFailure if one dies or stalls first.

        Rank 0 joins only then: a rendezvous rank 0 has entered cannot be abandoned (it waits inside the
        store for the missing rank), so the deaths that happen while starting are caught before it."""
        timeout = heartbeat_timeout()
        while len(self.ready) < len(self.procs):
            self.check()
            stalled = self.stalled(timeout)
            if stalled is not None:
                raise WorkerFailure(stalled)
            self.died.wait(0.1)

    def watch(self, fn, *args):
        """`fn(*args)` on rank 0's step thread, waited for in short slices: RuntimeError as soon as a worker has
        died (with its own error) or stopped sending heartbeats; Ctrl-C interrupts the wait at once. After
        either, the caller shuts the group down (close()), which releases the step thread from its collective."""
        self.check()
        timeout = heartbeat_timeout()
        self.interrupted.clear()
        future = self.inflight = self.executor.submit(fn, *args)
        while True:
            done, _ = concurrent.futures.wait([future], timeout=0.1)
            if done:
                return future.result()
            if self.interrupted.is_set():
                raise KeyboardInterrupt("a caller was interrupted while the engine waited on its workers")
            if self.failure is not None:
                raise WorkerFailure(self.failure)
            stalled = self.stalled(timeout)
            if stalled is not None:
                logger.error("%s", stalled)
                raise WorkerFailure(stalled)

    def check(self) -> None:
        """Raise RuntimeError if a worker has died or the group is shut down."""
        if self.failure is not None:
            raise WorkerFailure(self.failure)
        if self.closed:
            raise RuntimeError("the tensor-parallel workers are shut down (close() was called or a step failed); "
                               "create a new LLM")

    def death_error(self, error: BaseException) -> RuntimeError | None:
        """After `error` in a step: a RuntimeError naming the worker that died, or None if none did.

        A collective fails the moment a peer's connection drops, which can be just before the peer's exit
        is visible, so this waits briefly for one. Only errors a lost peer can cause (RuntimeError from a
        collective, OSError from a pipe) are considered; a ValueError every rank raised stays itself.
        """
        if not isinstance(error, (RuntimeError, OSError)) or isinstance(error, WorkerFailure):
            return None  # a WorkerFailure already says which worker and why
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
                proc.terminate() if graceful else proc.kill()  # a stopped process acts on SIGKILL only
        for proc in self.procs:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.monitor.join(timeout=2)
        if self.inflight is not None:  # its collective fails now that the peers are gone
            concurrent.futures.wait([self.inflight], timeout=5)
        self.executor.shutdown(wait=False)
        for conn in self.conns:
            conn.close()
