"""DecodeRecord: a decode step's inputs laid out in one block of bytes, so one copy moves them to the device.

A decode step needs six small arrays (token ids, positions, KV slots, context lengths, the pending-token index,
the block tables). Copied one by one they cost a copy each, and CUDA graphs then copy
them again into their static buffers. Here each array is a fixed view into one byte buffer: the host fills
its record's views, one copy moves the used bytes onto the device record, and the device record's views are
the tensors of the step (and the static inputs a backend's graphs capture), so a graph replays with no copy.

The scalar arrays are laid out for max_seqs rows each, the block tables last, so a step of n sequences needs the
bytes up to its last table row, `nbytes(n)`: its padding rows (a graph's batch size beyond n) are scalars only.

The step builder keeps two device records and two host records, used in turn (slot 0, 1, 0, ...), and moves a step
through a RecordCopier: `InOrderCopier` copies on the step's own stream, after the step before it; a backend may
give one that copies on a stream of its own while the step before computes (`Backend.record_copier`).
"""
import torch

ALIGN = 256  # bytes; each array starts as a fresh allocation would (JIT kernels specialise on pointer alignment)
_FIELDS = (  # name, dtype, rows per sequence
    ("ids", torch.int64, 1),
    ("positions", torch.int64, 1),
    ("slots", torch.int64, 1),
    ("pending", torch.int64, 2),  # the k input rows to fill from the step in flight, then its k token rows
    ("context_lens", torch.int32, 1),
)


class DecodeRecord:
    def __init__(self, max_seqs: int, max_blocks: int, device: torch.device, pin: bool = False):
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        sizes = [(name, dtype, (rows * max_seqs,)) for name, dtype, rows in _FIELDS]
        sizes.append(("tables", torch.int32, (max_seqs, max_blocks)))
        offsets, total = [], 0
        for _, dtype, shape in sizes:
            offsets.append(total)
            total += -(-dtype.itemsize * torch.Size(shape).numel() // ALIGN) * ALIGN
        self._tables_offset = offsets[-1]
        self.bytes = torch.zeros(total, dtype=torch.uint8, device=device, pin_memory=pin)
        for (name, dtype, shape), offset in zip(sizes, offsets):
            view = self.bytes[offset:offset + dtype.itemsize * torch.Size(shape).numel()].view(dtype).view(shape)
            setattr(self, name, view)
        self.clear()

    def clear(self) -> None:
        """Every row padding: token 0 at position 0, storing nothing (slot -1), attending to nothing."""
        self.bytes.zero_()
        self.slots.fill_(-1)

    def pending_index(self, k: int) -> torch.Tensor:
        """The [2, k] pending-token index (contiguous): rows of the step, rows of the step in flight's tokens."""
        return self.pending[:2 * k].view(2, k)

    def nbytes(self, rows: int) -> int:
        """Bytes from the record's start through block-table row `rows` - 1 (all scalar arrays included)."""
        return self._tables_offset + rows * self.max_blocks * 4

    def copy_from(self, host: "DecodeRecord", rows: int) -> None:
        """Copy the first `rows` rows of every array from `host` (asynchronously when it is pinned)."""
        n = self.nbytes(rows)
        self.bytes[:n].copy_(host.bytes[:n], non_blocking=True)


class InOrderCopier:
    """Copies a host record to a device record in the order of the device's work (its current stream): the copy
    runs after the steps launched before it and before the one it feeds. The default `Backend.record_copier`.

    A RecordCopier's contract: `before_fill(slot)` returns once host record `slot` may be rewritten (its last copy
    has read it); `copy(dst, src, rows, slot)` moves `rows` rows of host record `src` into device record `dst`
    (both of turn `slot`) so that the work launched after it sees them, and never while a step launched before it
    still reads `dst`. Slots alternate 0, 1, 0, ... from one decode step to the next."""

    def before_fill(self, slot: int) -> None:
        pass  # this copy ran in stream order before its step, which the engine waited for before reusing the slot

    def copy(self, dst: DecodeRecord, src: DecodeRecord, rows: int, slot: int) -> None:
        dst.copy_from(src, rows)
