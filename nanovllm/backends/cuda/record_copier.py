"""SideStreamCopier: a decode step's inputs moved to the GPU on a copy stream while the step before it computes.

In stream order the step's one host-to-device copy (`core/decode_record.py`: ~270 KB at batch 256, 4,096-token
contexts) waits for the step before it to end, and the next step waits for the copy: ~5 us of copy plus the hand
over between the copy engine and the SMs, each decode step (the GPU's idle time between steps, benchmarks/
profile_steps.py). Here the copy goes on a stream of its own into the device record the step before did not use
(the step builder alternates two), so it overlaps that step, and the step's own stream only waits for its end.

Ordering, with slots alternating from one decode step to the next (step N in slot s, N+1 in slot 1 - s):
- the copy into device record s waits for `free[s]`: recorded on the compute stream when step N - 1 (slot 1 - s)
  was built, so it marks the end of everything launched before N - 1, step N - 2 (the last reader of record s)
  included, and nothing launched after;
- `done[s]` marks the copy's end: the compute stream waits for it before the step, and the host waits for it
  before refilling host record s (`before_fill`), two decode steps later.
"""
import torch

from nanovllm.core.decode_record import DecodeRecord


class SideStreamCopier:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # an event never recorded is complete: waiting for it (host or stream) returns at once
        self.free = [torch.cuda.Event(), torch.cuda.Event()]  # device record s: all work up to its last reader
        self.done = [torch.cuda.Event(), torch.cuda.Event()]  # host record s: its last copy

    def before_fill(self, slot: int) -> None:
        self.done[slot].synchronize()

    def copy(self, dst: DecodeRecord, src: DecodeRecord, rows: int, slot: int) -> None:
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_event(self.free[slot])
        self.free[slot ^ 1].record(compute)  # the work so far: its last step read record 1 - slot
        with torch.cuda.stream(self.stream):
            dst.copy_from(src, rows)
        self.done[slot].record(self.stream)
        compute.wait_event(self.done[slot])
