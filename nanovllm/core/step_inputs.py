"""StepInputBuilder: turns a ScheduledBatch into the step's device tensors and StepMetadata.

The decode path (the hot one: every step after the prompts) is vectorised with numpy over persistent
host buffers (pinned where the backend asks), copied to the device asynchronously. Two sets of host
buffers alternate, so building step N+1 never overwrites what step N's copies are still reading.
"""
import numpy as np
import torch

from nanovllm.core.sampling.prompt_logprobs import prompt_positions
from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata, StepMetadata, longest_first


class _HostBuffers:
    def __init__(self, max_seqs: int, max_blocks: int, pin: bool):
        def buf(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.ids = buf((max_seqs,), torch.int64)
        self.positions = buf((max_seqs,), torch.int64)
        self.slots = buf((max_seqs,), torch.int64)
        self.context_lens = buf((max_seqs,), torch.int32)
        self.order = buf((max_seqs,), torch.int32)
        self.tables = buf((max_seqs, max_blocks), torch.int32)


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_num_seqs: int, max_blocks_per_seq: int, pin: bool,
                 table_multiple: int = 1):
        """`table_multiple`: block tables are padded to a width that is a multiple of it (the backend's
        `block_table_multiple`)."""
        self.device, self.block_size = device, block_size
        self.pin, self.table_multiple = pin, table_multiple
        self.buffers = [_HostBuffers(max_num_seqs, max_blocks_per_seq, pin) for _ in range(2)]
        self.turn = 0

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)

    def build(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        if batch.num_prefill_seqs == 0:
            return self.build_decode(batch)
        return self.build_general(batch)

    def build_decode(self, batch: ScheduledBatch):
        """One token per sequence: the last of its tokens, at position context_len - 1."""
        seqs, n, bs = batch.seqs, len(batch.seqs), self.block_size
        buf = self.buffers[self.turn]
        self.turn ^= 1
        ids, positions, slots = buf.ids.numpy()[:n], buf.positions.numpy()[:n], buf.slots.numpy()[:n]
        context_lens = buf.context_lens.numpy()[:n]
        tables = buf.tables.numpy()[:n]  # whole rows: a contiguous slice copies without a host-side gather
        for i, s in enumerate(seqs):
            ids[i] = s.token_ids[s.num_computed_tokens]
            context_lens[i] = s.num_computed_tokens + 1
            table = s.block_table
            tables[i, :len(table)] = table
        np.subtract(context_lens, 1, out=positions)
        slots[:] = tables[np.arange(n), positions // bs].astype(np.int64) * bs + positions % bs
        buf.order.numpy()[:n] = longest_first(context_lens)
        decode = DecodeMetadata(self._to_device(buf.context_lens[:n]), self._to_device(buf.tables[:n]),
                                int(context_lens.max()), self._to_device(buf.order[:n]))
        logits_indices = torch.arange(n, device=self.device)
        meta = StepMetadata(self._to_device(buf.slots[:n]), 0, None, decode, logits_indices)
        return self._to_device(buf.ids[:n]), self._to_device(buf.positions[:n]), meta

    def build_general(self, batch: ScheduledBatch):
        """Prefill chunks first, then decodes; numpy per sequence (prefill steps are few and large)."""
        bs = self.block_size
        input_ids, positions, slots, logits_indices = [], [], [], []
        cu_q, cu_k, tables, context_lens = [0], [0], [], []
        p = batch.num_prefill_seqs
        any_cached = False
        num_tokens = 0
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
                                      block_table_tensor(tables[:p]) if any_cached else None)
        if len(batch.seqs) > p:
            decode = DecodeMetadata(tensor(context_lens, torch.int32), block_table_tensor(tables[p:]), max(context_lens),
                                    tensor(longest_first(context_lens), torch.int32))
        meta = StepMetadata(tensor(slots, torch.int64), cu_q[-1], prefill, decode,
                            tensor(logits_indices + prompt_indices, torch.int64), tuple(prompt_rows))
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta
