"""The mps backend's kernels against cpu_ref's on random paged layouts, and its backend facts, on CPU tensors.

The kernels are plain torch, so running them on the CPU checks their logic; MPS numerics need a Mac.
"""
import pytest
import torch

from nanovllm.backends.cpu_ref import attention as ref_attention
from nanovllm.backends.mps import attention, memory
from nanovllm.backends.mps.plugin import MpsBackend
from nanovllm.core.config import EngineConfig
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata
from tests.conftest import debug_messages

NUM_KV_HEADS, HEAD_DIM = 2, 32
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def paged_layout(context_lens: list[int], block_size: int, gen: torch.Generator, spare_blocks: int = 5):
    """Scattered block tables: each sequence gets random blocks out of a shuffled pool, padded with 0."""
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, width = [], max(needed)
    for n in needed:
        tables.append(pool[:n] + [0] * (width - n))
        pool = pool[n:]
    return num_blocks, torch.tensor(tables, dtype=torch.int32)


def random_cache(num_blocks: int, block_size: int, tables: torch.Tensor, context_lens: list[int],
                 gen: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches holding random K/V in every sequence's context slots and NaN everywhere else."""
    shape = (num_blocks * block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    for table, n in zip(tables.tolist(), context_lens):
        slots = torch.tensor([table[t // block_size] * block_size + t % block_size for t in range(n)])
        k_cache[slots] = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v_cache[slots] = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    view = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    return k_cache.view(view), v_cache.view(view)


def nan_poisoned(out: torch.Tensor) -> torch.Tensor:
    return out.fill_(float("nan"))


def run_both(fn, ref_fn, *args):
    out, ref = fn(*args), ref_fn(*args)
    assert not out.isnan().any(), "the mps kernel left NaN in its output"
    return out, ref


DECODE_CASES = {
    "mixed": [1, 17, 2048, 300, 16, 5],
    "single_token": [1],
    "long": [2048, 1999],
}


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference(group, case, block_size):
    gen = torch.Generator().manual_seed(100 * group + block_size + len(DECODE_CASES[case]))
    context_lens = DECODE_CASES[case]
    num_blocks, tables = paged_layout(context_lens, block_size, gen)
    k_cache, v_cache = random_cache(num_blocks, block_size, tables, context_lens, gen, torch.float32)
    q = torch.randn(len(context_lens), NUM_KV_HEADS * group, HEAD_DIM, generator=gen)
    meta = DecodeMetadata(torch.tensor(context_lens, dtype=torch.int32), tables, max(context_lens))
    out, ref = run_both(attention.decode_attention, ref_attention.decode_attention, q, k_cache, v_cache, meta, 0.17)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


PREFILL_CASES = {  # (query length, cached prefix length) per sequence
    "single_token": [(1, 0)],
    "mixed": [(1, 0), (37, 0), (300, 0), (2048, 0)],
    "cached_prefix": [(1, 32), (20, 16), (300, 700), (5, 2043)],
    "chunked": [(64, 64), (64, 128), (33, 0)],
    "short": [(3, 0), (100, 0), (260, 0)],
}


def prefill_inputs(case: str, group: int, block_size: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    specs = PREFILL_CASES[case]
    q_lens = [n for n, _ in specs]
    context_lens = [n + cached for n, cached in specs]
    num_blocks, tables = paged_layout(context_lens, block_size, gen)
    k_cache, v_cache = random_cache(num_blocks, block_size, tables, context_lens, gen, dtype)
    # this step's K/V are the last q_len rows of each context, as the engine stores them before attention
    k_ctx = ref_attention.gather_context  # the reference's own reader, so both sides see the same rows
    k = torch.cat([k_ctx(k_cache, t, n)[n - m:] for t, n, m in zip(tables, context_lens, q_lens)])
    v = torch.cat([k_ctx(v_cache, t, n)[n - m:] for t, n, m in zip(tables, context_lens, q_lens)])
    q = torch.randn(sum(q_lens), NUM_KV_HEADS * group, HEAD_DIM, generator=gen).to(dtype)
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + context_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    any_cached = any(cached for _, cached in specs)
    meta = PrefillMetadata(cu_q, cu_k, max(q_lens), max(context_lens), tables if any_cached else None)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(group, case):
    args = prefill_inputs(case, group, block_size=16, seed=group)
    out, ref = run_both(attention.prefill_attention, ref_attention.prefill_attention, *args, 0.2)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_prefill_block_table_reads_cache_not_step_kv():
    """With a block table, K/V come from the cache: garbage in this step's k, v must not matter."""
    q, k, v, k_cache, v_cache, meta = prefill_inputs("cached_prefix", 2, block_size=16)
    out = attention.prefill_attention(q, torch.full_like(k, float("nan")), torch.full_like(v, float("nan")),
                                      k_cache, v_cache, meta, 0.2)
    ref = ref_attention.prefill_attention(q, k, v, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_warmup_prefill_without_cache_matches_reference():
    q, k, v, _, _, meta = prefill_inputs("mixed", 2, block_size=16)
    empty = torch.empty(0)
    out, ref = run_both(attention.prefill_attention, ref_attention.prefill_attention, q, k, v, empty, empty, meta, 0.2)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_long_prompt_split_into_query_slices_matches_reference(monkeypatch):
    """A tiny scores budget forces the query-slice loop that bounds memory for long prompts."""
    monkeypatch.setattr(attention, "MAX_SCORES_BYTES", 1 << 18)
    for case in ("chunked", "short"):  # with a cached prefix, and without (causal key trimming)
        args = prefill_inputs(case, 4, block_size=16)
        out, ref = run_both(attention.prefill_attention, ref_attention.prefill_attention, *args, 0.2)
        torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_float16_matches_reference_within_half_tolerance():
    args = prefill_inputs("chunked", 2, block_size=16, dtype=torch.float16)
    out, ref = run_both(attention.prefill_attention, ref_attention.prefill_attention, *args, 0.2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float16])


def test_attention_logs_the_case_at_debug():
    q, k, v, k_cache, v_cache, meta = prefill_inputs("chunked", 1, block_size=16)
    warmup_meta = PrefillMetadata(meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q, meta.max_seqlen_q)
    with debug_messages(attention.__name__) as messages:
        attention.prefill_attention(q, k, v, k_cache, v_cache, meta, 0.2)
        attention.prefill_attention(q, k, v, torch.empty(0), torch.empty(0), warmup_meta, 0.2)
    assert "paged prefill" in messages[0] and "3 seqs" in messages[0]
    assert "warm-up" in messages[1]


# ---- backend facts ------------------------------------------------------------------------------
def config(**options) -> EngineConfig:
    return EngineConfig(model="unused", **options)


def test_cpu_device_is_available_and_float32():
    backend = MpsBackend()
    assert backend.availability("cpu") == (True, "")
    device = backend.device(config(device="cpu"))
    assert device == torch.device("cpu")
    assert backend.default_dtype_for(device) == torch.float32
    assert backend.default_dtype_for(torch.device("mps")) == torch.float16


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_device_unavailable_here_says_why():
    ok, reason = MpsBackend().availability(None)
    assert not ok and "MPS is not available" in reason and "device='cpu'" in reason


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="runs on 'mps'.*or 'cpu'"):
        MpsBackend().device(config(device="cuda"))


def test_kv_budget_is_fixed():
    cpu = torch.device("cpu")
    assert memory.kv_cache_budget(config(), cpu, 1 << 20) == memory.DEFAULT_NUM_KVCACHE_BLOCKS == 1024
    assert memory.kv_cache_budget(config(num_kvcache_blocks=7), cpu, 1 << 20) == 7


def test_tensor_parallelism_is_refused_with_reason():
    with pytest.raises(RuntimeError, match="mps backend does not support tensor parallelism"):
        MpsBackend().communicator(0, 2, "")
