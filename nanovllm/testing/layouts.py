"""Random paged KV layouts for parity checks: scattered block tables, ragged lengths, poisoned free space.

A layout is what one step of the engine would hand the attention kernels: per sequence a cached prefix
(possibly empty) and a query chunk, the whole context already stored in a paged cache whose blocks are
shuffled across the pool. Every cache row no sequence owns holds NaN (float) so a kernel that reads
past a context, or through a padding entry of a block table, shows up as NaN in its output. A case with an
FP8 `kv_cache_dtype` stores quantised values with random per-KV-head scales (`PagedLayout.kv_scales`).
"""
from dataclasses import dataclass

import torch

from nanovllm.core.kv_quant import dequantize, is_fp8, quantize
from nanovllm.core.tolerances import TOLERANCES  # noqa: F401  (re-exported: the harness's table lives in the core)


@dataclass(frozen=True)
class ParityCase:
    """The shape of one random problem; `seed` makes its numbers reproducible."""
    dtype: torch.dtype = torch.float32
    head_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    block_size: int = 16
    num_seqs: int = 3
    max_context_len: int = 70
    seed: int = 0
    kv_cache_dtype: torch.dtype | None = None  # None: the cache holds `dtype`

    def __str__(self) -> str:
        kv = f" kv={str(self.kv_cache_dtype).removeprefix('torch.')}" if self.kv_cache_dtype else ""
        return (f"{str(self.dtype).removeprefix('torch.')}{kv} head_dim={self.head_dim} heads={self.num_heads}/"
                f"{self.num_kv_heads} block_size={self.block_size} seqs={self.num_seqs} seed={self.seed}")

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype


DEFAULT_CASES: tuple[ParityCase, ...] = (
    ParityCase(),
    ParityCase(torch.float32, 128, 8, 8, 32, num_seqs=4, max_context_len=100, seed=1),  # MHA
    ParityCase(torch.float32, 64, 8, 1, 16, num_seqs=5, seed=2),                       # MQA
    ParityCase(torch.float16, 64, 6, 2, 16, seed=3),                                    # GQA 3
    ParityCase(torch.bfloat16, 128, 4, 2, 32, seed=4),
    ParityCase(torch.float32, 48, 4, 2, 8, num_seqs=2, max_context_len=40, seed=5),    # odd head dim
    ParityCase(torch.float32, 64, 4, 2, 16, seed=6, kv_cache_dtype=torch.float8_e4m3fn),  # FP8 KV cache
    ParityCase(torch.bfloat16, 128, 8, 2, 32, seed=7, kv_cache_dtype=torch.float8_e5m2),
    ParityCase(torch.float16, 64, 6, 2, 16, seed=8, kv_cache_dtype=torch.float8_e4m3fn),
)


@dataclass
class PagedLayout:
    """One step's worth of paged state; tensors on the device the layout was built for."""
    k_cache: torch.Tensor        # [num_blocks, block_size, num_kv_heads, head_dim], NaN where unowned
    v_cache: torch.Tensor
    block_tables: torch.Tensor   # [num_seqs, max_num_blocks] int32; padding entries are random real blocks
    context_lens: list[int]      # cached prefix + query chunk, per sequence
    query_lens: list[int]        # tokens computed this step, per sequence
    slot_mapping: torch.Tensor   # [sum(query_lens)] int64, the slots of this step's tokens
    kv_scales: tuple[torch.Tensor, ...] = ()  # FP8 cache: (k_scale, v_scale), each [num_kv_heads] float32

    @property
    def num_cached(self) -> list[int]:
        return [c - q for c, q in zip(self.context_lens, self.query_lens)]

    def query_rows(self, cache: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This step's K or V rows, read back from `cache` (an FP8 one dequantised into `dtype`):
        [sum(query_lens), num_kv_heads, head_dim]."""
        rows = cache.flatten(0, 1)[self.slot_mapping]
        if not is_fp8(cache.dtype):
            return rows
        return dequantize(rows, self.kv_scales[0 if cache is self.k_cache else 1]).to(dtype)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, -1)


def random_layout(case: ParityCase, device: torch.device, query_lens: str, generator: torch.Generator) -> PagedLayout:
    """query_lens: "decode" (one token each), "prefill" (whole contexts) or "chunked" (cached prefix + chunk)."""
    def randint(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    bs = case.block_size
    context_lens = [randint(1, case.max_context_len) for _ in range(case.num_seqs)]
    if query_lens == "decode":
        q_lens = [1] * case.num_seqs
    elif query_lens == "prefill":
        q_lens = list(context_lens)
    elif query_lens == "chunked":
        context_lens = [max(c, 2) for c in context_lens]
        q_lens = [randint(1, c - 1) for c in context_lens]
        q_lens[0] = context_lens[0]  # one sequence without a cached prefix, mixed with ones that have it
    else:
        raise ValueError(f"query_lens={query_lens!r}: expected 'decode', 'prefill' or 'chunked'")
    blocks_per_seq = [-(-c // bs) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody owns: poisoned
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(blocks_per_seq) + 1
    tables = torch.randint(0, num_blocks, (case.num_seqs, width), generator=generator, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor(order[start:start + n], dtype=torch.int32)
        start += n
    shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=case.cache_dtype)
    v_cache = torch.full(shape, float("nan"), dtype=case.cache_dtype)
    fp8 = is_fp8(case.cache_dtype)
    # per-head scales over two decades, values a few times each scale: a kernel that ignores a scale differs
    scales = [10 ** (torch.rand(case.num_kv_heads, generator=generator) * 2 - 1.5) for _ in range(2)] if fp8 else []

    def stored(cache_index: int, num_rows: int) -> torch.Tensor:
        values = torch.randn(num_rows, *shape[2:], generator=generator)
        if not fp8:
            return values.to(case.dtype)
        return quantize(values * 8 * scales[cache_index][:, None], scales[cache_index], case.cache_dtype)

    slots = []
    for i, (c, q) in enumerate(zip(context_lens, q_lens)):
        owned = tables[i, :blocks_per_seq[i]].long()
        rows = (owned.unsqueeze(1) * bs + torch.arange(bs)).flatten()[:c]
        k_cache.view(-1, *shape[2:])[rows] = stored(0, c)
        v_cache.view(-1, *shape[2:])[rows] = stored(1, c)
        slots.append(rows[c - q:])
    return PagedLayout(k_cache.to(device), v_cache.to(device), tables.to(device), context_lens, q_lens,
                       torch.cat(slots).to(device), tuple(s.to(device) for s in scales))
