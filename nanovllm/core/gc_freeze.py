"""Keep the objects start-up made out of the garbage collector's full collections.

Start-up leaves a few million long-lived objects behind (the model's modules, torch.compile's, Triton's and
transformers' caches). CPython's full (generation-2) collection walks every one of them, and it comes when enough
new objects have survived since the last one, at a moment no one chooses: on the H200's host one took 369 ms in
the middle of the seed benchmark's first prefill step (a 5.58 s run beside 5.07-5.12 s runs of the same code).

After start-up the engine collects once and freezes what is alive (`gc.freeze`: a permanent generation that
collections skip), as vLLM does. Reference counting still frees frozen objects that nothing points to; only
cyclic garbage among them waits, until the next engine start-up (which unfreezes, collects and freezes again),
until the last open engine closes (which unfreezes), or until exit (unfrozen first, so the interpreter's final
collection sees everything).
"""
import atexit
import gc
import threading

_lock = threading.Lock()
_open_engines = 0


def freeze_after_start_up() -> None:
    """Collect everything (frozen objects included) and freeze what survives; one call per engine started."""
    global _open_engines
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _open_engines += 1


def release_on_close() -> None:
    """An engine that froze closes: the last one gives every frozen object back to the collector."""
    global _open_engines
    with _lock:
        if _open_engines == 0:
            return
        _open_engines -= 1
        if _open_engines == 0:
            gc.unfreeze()


@atexit.register
def _unfreeze_at_exit() -> None:
    gc.unfreeze()
