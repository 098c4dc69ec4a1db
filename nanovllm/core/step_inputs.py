"""StepInputBuilder: turns a ScheduledBatch into the step's device tensors and StepMetadata.

The decode path (the hot one: every step after the prompts) is vectorised with numpy over a host
DecodeRecord (pinned where the backend asks). Where the backend's graphs capture it, one asynchronous copy moves
it to a device record (`core/decode_record.py`), whose views are the step's tensors. Two host and two device records
alternate (slot 0, 1, 0, ... a decode step), so building step N+1 never overwrites what step N's copy reads or
step N computes from, and the backend's RecordCopier may move step N+1 while step N runs.
"""
from collections.abc import Sequence

import numpy as np
import torch

from nanovllm.core.decode_record import DecodeRecord, InOrderCopier
from nanovllm.core.sampling.prompt_logprobs import prompt_positions
from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata, StepMetadata, longest_first

Pending = tuple[Sequence[int], Sequence[int]]  # (rows of the batch, rows of the step in flight)
Step = tuple[torch.Tensor, torch.Tensor, StepMetadata, torch.Tensor | None]


def _in_place(t: torch.Tensor) -> torch.Tensor:
    return t


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_num_seqs: int, max_blocks_per_seq: int, pin: bool,
                 table_multiple: int = 1, device_record: bool = False):
        """`table_multiple`: block tables are padded to a width that is a multiple of it (the backend's
        `block_table_multiple`). `device_record`: decode steps are views of one record on the device, moved there
        by one copy (for backends whose graphs capture it); otherwise each tensor is copied on its own."""
        self.device, self.block_size = device, block_size
        self.pin, self.table_multiple = pin, table_multiple
        self.host = [DecodeRecord(max_num_seqs, max_blocks_per_seq, torch.device("cpu"), pin) for _ in range(2)]
        self.turn = 0
        # the decode steps' tensors are views of these records, one per slot (a backend's graphs capture them as
        # their inputs); the copier moves each step's host record into its slot's
        self.records = ([DecodeRecord(max_num_seqs, max_blocks_per_seq, device) for _ in range(2)]
                        if device_record and device.type != "cpu" else None)
        self.copier = InOrderCopier()
        # decode steps are padded to the smallest of these sizes that holds them (the captured graphs' batch sizes):
        # padding rows store nothing (slot -1), attend to nothing (context length 0) and come last in the order
        self.pad_sizes: list[int] = []
        self.iota = torch.arange(max_num_seqs, device=device)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)

    def build(self, batch: ScheduledBatch, pending: Pending = ((), ())) -> Step:
        """The step's input ids, positions, metadata and pending-token index: `pending` = (rows of this batch,
        rows of the step in flight) for the sequences whose input token that step is still sampling; the index is
        the pair as a [2, k] int64 device tensor (None when k = 0)."""
        if batch.num_prefill_seqs == 0:
            return self.build_decode(batch, pending)
        return self.build_general(batch, pending)

    def build_decode(self, batch: ScheduledBatch, pending: Pending = ((), ())) -> Step:
        """One token per sequence: the last of its tokens, at position context_len - 1. Filled into a host record,
        copied to the device record in one copy (`device_record`), padded to the graphs' size."""
        seqs, n, bs = batch.seqs, len(batch.seqs), self.block_size
        rows = next((size for size in self.pad_sizes if size >= n), n)
        slot = self.turn
        host = self.host[slot]
        self.turn ^= 1
        if self.records is not None:
            self.copier.before_fill(slot)
        ids, positions, slots = host.ids.numpy(), host.positions.numpy(), host.slots.numpy()
        context_lens = host.context_lens.numpy()
        tables = host.tables.numpy()[:n]  # whole rows: a contiguous slice copies without a host-side gather
        for i, s in enumerate(seqs):
            ids[i] = s.token_ids[s.num_computed_tokens]
            context_lens[i] = s.num_computed_tokens + 1
            table = s.block_table
            tables[i, :len(table)] = table
        np.subtract(context_lens[:n], 1, out=positions[:n])
        slots[:n] = tables[np.arange(n), positions[:n] // bs].astype(np.int64) * bs + positions[:n] % bs
        ids[n:rows], positions[n:rows], slots[n:rows], context_lens[n:rows] = 0, 0, -1, 0
        k = len(pending[0])
        if k:
            host.pending.numpy()[:2 * k] = np.concatenate(pending)
        r, dev = host, self._to_device  # without a device record: each tensor copied on its own (none on the CPU)
        if self.records is not None:
            r, dev = self.records[slot], _in_place
            self.copier.copy(r, host, n, slot)  # padding rows: their scalars (all rows are copied), no table rows
        # no seq_order: the scheduler hands decode steps over longest first (Scheduler._schedule_decode)
        decode = DecodeMetadata(dev(r.context_lens[:n]), dev(r.tables[:n]), int(context_lens[:n].max()))
        meta = StepMetadata(dev(r.slots[:n]), 0, None, decode, self.iota[:n])
        return dev(r.ids[:n]), dev(r.positions[:n]), meta, dev(r.pending_index(k)) if k else None

    def build_general(self, batch: ScheduledBatch, pending: Pending = ((), ())) -> Step:
        """Prefill chunks first, then decodes; numpy per sequence (prefill steps are few and large)."""
        bs = self.block_size
        input_ids, positions, slots, logits_indices = [], [], [], []
        cu_q, cu_k, tables, context_lens = [0], [0], [], []
        p = batch.num_prefill_seqs
        any_cached = False
        prefix_free_tokens = num_tokens = 0
        prompt_rows, prompt_indices = [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            pos = np.arange(start, end, dtype=np.int64)
            positions.append(pos)
            table = seq.block_table
            slots.append(np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs)
            wanted = prompt_positions(seq, start, end) if i < p else range(0)
            if wanted:
                prompt_rows.append((i, wanted.start, len(wanted)))
                prompt_indices.extend(range(num_tokens + wanted.start - start, num_tokens + wanted.stop - start))
            num_tokens += n
            if batch.sample[i]:
                logits_indices.append(num_tokens - 1)
            if i < p:
                cu_q.append(cu_q[-1] + n)
                cu_k.append(cu_k[-1] + end)
                any_cached |= start > 0
                prefix_free_tokens += n if start == 0 else 0
            else:
                context_lens.append(end)
            tables.append(table)
        input_ids, positions, slots = (np.concatenate(x) for x in (input_ids, positions, slots))

        def tensor(values, dtype):
            if isinstance(values, np.ndarray):
                host = torch.from_numpy(values).to(dtype)
                return (host.pin_memory() if self.pin else host).to(self.device, non_blocking=True)
            return torch.tensor(values, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=True)

        def block_table_tensor(rows):
            width = -(-max(len(r) for r in rows) // self.table_multiple) * self.table_multiple
            return tensor([r + [0] * (width - len(r)) for r in rows], torch.int32)

        prefill = decode = None
        if p:
            prefill = PrefillMetadata(tensor(cu_q, torch.int32), tensor(cu_k, torch.int32),
                                      max(b - a for a, b in zip(cu_q, cu_q[1:])),
                                      max(b - a for a, b in zip(cu_k, cu_k[1:])),
                                      block_table_tensor(tables[:p]) if any_cached else None,
                                      prefix_free_tokens=prefix_free_tokens)
        if len(batch.seqs) > p:
            decode = DecodeMetadata(tensor(context_lens, torch.int32), block_table_tensor(tables[p:]), max(context_lens),
                                    tensor(longest_first(context_lens), torch.int32))
        meta = StepMetadata(tensor(slots, torch.int64), cu_q[-1], prefill, decode,
                            tensor(logits_indices + prompt_indices, torch.int64), tuple(prompt_rows))
        return (tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta,
                tensor(pending, torch.int64) if pending[0] else None)
