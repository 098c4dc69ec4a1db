"""What the engine loop hands its callers: RequestDelta items through a thread-safe OutputChannel.

The loop puts every item a channel got in one step with one `put` (one wake-up per caller per step, not one per
token); the caller takes everything that arrived with one `get`. A failed step or a shut-down engine ends the
channel with the error, which the caller's `get` raises. `AsyncOutputChannel` wakes an asyncio task instead of a
thread.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

from nanovllm.core.sequence import Sequence


@dataclass
class RequestDelta:
    """What one step added to one sample of a request: its new token ids, their text (streamed requests only) and
    logprobs (requests that asked), and on the sample's last delta `finished`, `finish_reason` and the finished
    `seq` (whose `group` holds all samples; `request_finished` once every one has finished).

    `prompt_logprobs` (one entry per prompt token, None first) rides on a request's first delta when asked for.
    """
    request_id: str
    index: int  # the request's position in its call
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None = None
    seq: Sequence | None = None  # set on the last delta: read-only for the caller from then on
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_prompt_tokens: int = 0
    first_token_time: float | None = None  # time.monotonic() at its first committed token (for metrics)
    sample_index: int = 0  # which of the request's n samples (SamplingParams.n) this delta is about
    request_finished: bool = False  # every sample of the request is finished (for n = 1: `finished`)


class OutputChannel:
    """A queue of RequestDelta items from the loop thread to one consumer thread."""

    def __init__(self):
        self._items: deque[RequestDelta] = deque()
        self._error: BaseException | None = None
        self._ready = threading.Condition(threading.Lock())

    def put(self, items: list[RequestDelta]) -> None:
        with self._ready:
            self._items.extend(items)
            self._ready.notify()

    def fail(self, error: BaseException) -> None:
        """End the channel: the consumer's next `get` raises `error` (after the items already put)."""
        with self._ready:
            self._error = error
            self._ready.notify()

    def get(self, timeout: float | None = None) -> list[RequestDelta]:
        """Every item put so far (waiting for at least one, up to `timeout` seconds: [] when it passes); raises
        the channel's error once its items are taken."""
        with self._ready:
            if not self._items and self._error is None:
                self._ready.wait(timeout)
            return self._take()

    def _take(self) -> list[RequestDelta]:
        if self._items:
            items = list(self._items)
            self._items.clear()
            return items
        if self._error is not None:
            raise self._error
        return []


class AsyncOutputChannel(OutputChannel):
    """The same queue, consumed by a coroutine on `loop`: the loop thread wakes it with call_soon_threadsafe."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._event = asyncio.Event()

    def put(self, items: list[RequestDelta]) -> None:
        with self._ready:
            self._items.extend(items)
        self._wake()

    def fail(self, error: BaseException) -> None:
        with self._ready:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get_async(self) -> list[RequestDelta]:
        while True:
            with self._ready:
                if self._items or self._error is not None:
                    self._event.clear()
                    return self._take()
            await self._event.wait()
            self._event.clear()
