"""Keep the objects start-up made out of the garbage collector's full collections.

Start-up leaves a few hundred thousand to millions of long-lived objects behind (the model's modules,
torch.compile's, Triton's and transformers' caches). CPython's full (generation-2) collection walks every one of
them, and it comes when enough new objects have survived since the last one, at a moment no one chooses: on the
H200's host one took 369 ms in the middle of the seed benchmark's first prefill step (a 5.58 s run beside
5.07-5.12 s runs of the same code).

After start-up the engine collects once and freezes what is alive (`gc.freeze`: a permanent generation that
collections skip), as vLLM does; the collection costs ~0.17 s once (the embedded model on a CPU). Reference
counting still frees frozen objects that nothing points to; only cyclic garbage among them waits, until the next
engine start-up (which unfreezes, collects and freezes again), until the last open engine closes (which
unfreezes), or until exit (unfrozen first, so the interpreter's final collection sees everything).
"""
import atexit
import gc
import threading


class StartUpFreeze:
    """The process's frozen generation, shared by its engines. Engines keep a reference to it (and it to the gc
    module), so one closed while the interpreter exits, after module globals are cleared, still closes cleanly."""

    def __init__(self):
        # Reentrant: freeze's collection may find an unclosed engine in a reference cycle, whose __del__ closes it
        # and calls release in the same thread, under the lock freeze holds.
        self.lock = threading.RLock()
        self.open_engines = 0
        self.exiting = False
        self.gc = gc

    def freeze(self) -> None:
        """Collect everything (frozen objects included) and freeze what survives; one call per engine started."""
        with self.lock:
            self.gc.unfreeze()
            self.gc.collect()
            self.gc.freeze()
            self.open_engines += 1

    def release(self) -> None:
        """An engine that froze closes: the last one gives every frozen object back to the collector."""
        with self.lock:
            if self.open_engines == 0 or self.exiting:
                return
            self.open_engines -= 1
            if self.open_engines == 0:
                self.gc.unfreeze()

    def at_exit(self) -> None:
        with self.lock:
            self.exiting = True
            self.gc.unfreeze()


START_UP_FREEZE = StartUpFreeze()
atexit.register(START_UP_FREEZE.at_exit)
