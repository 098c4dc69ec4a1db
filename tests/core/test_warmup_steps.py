"""The full-size warm-up (core/warmup_steps.py): it runs what a real first prefill step runs, so that step pays no
first-use cost (a new kernel specialisation, a first allocation) on the GPU. On the CPU it runs on cpu_ref and
the kernel calls are recorded at the ops' boundary, with each argument reduced to what Triton specialises a
kernel on (dtype, strides and pointers by ==1 / %16); sizes, which only shape the launch grid, are left out."""
import dataclasses

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.core.runner_setup import warm_up_kernels
from nanovllm.core.warmup_steps import TOKENS_PER_SEQ, warm_up_full_steps, warm_up_lengths, warm_up_longest_context


@pytest.mark.parametrize("max_tokens, max_model_len, max_num_seqs, num_blocks", [
    (16384, 4096, 256, 10**5), (16384, 40960, 256, 10**5), (256, 100, 8, 1000), (300, 64, 3, 1000), (256, 64, 8, 9)])
def test_lengths_fill_the_step_within_the_limits(max_tokens, max_model_len, max_num_seqs, num_blocks):
    lengths = warm_up_lengths(max_tokens, max_model_len, max_num_seqs, 16, num_blocks)
    assert len(lengths) >= 2 and len(lengths) <= max_num_seqs
    assert all(16 < n <= min(TOKENS_PER_SEQ, max_model_len - 1) for n in lengths)
    assert sum(-(-n // 16) for n in lengths) <= num_blocks
    if num_blocks >= 1000 and max_num_seqs * min(TOKENS_PER_SEQ, max_model_len - 1) >= max_tokens:
        assert sum(lengths) == max_tokens  # a step of max_num_batched_tokens tokens, as the scheduler fills
    if max_tokens == 16384 and max_model_len >= TOKENS_PER_SEQ:
        assert len(lengths) == 16


def test_no_lengths_when_two_sequences_do_not_fit():
    assert warm_up_lengths(256, 64, 8, 16, num_blocks=3) == []
    assert warm_up_lengths(256, 17, 8, 16, num_blocks=100) == []  # one block a sequence: no cached prefix possible


def spec(x):
    """What Triton specialises a kernel on, for one argument of an op (recursively for metadata)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, x.dim(), tuple((s == 1, s % 16 == 0) for s in x.stride()), x.data_ptr() % 16 == 0)
    if dataclasses.is_dataclass(x):  # step metadata: its tensors, and which are absent (e.g. no block tables)
        return (type(x).__name__,) + tuple(spec(getattr(x, f.name)) for f in dataclasses.fields(x)
                                           if not isinstance(getattr(x, f.name), (int, float, tuple, list)))
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return ("int", x == 1, x % 16 == 0)
    return type(x).__name__


def record_calls(runner, calls: list):
    """Wrap the runner's attention ops and sampler so each call appends (op, argument specs, call) to `calls`."""
    def wrap(op, fn):
        def recorded(*args):
            calls.append((op, tuple(spec(a) for a in args), args))
            return fn(*args)
        return recorded
    for attn in runner.attention_layers:
        attn.store, attn.prefill, attn.decode = (wrap("store", attn.store), wrap("prefill", attn.prefill),
                                                 wrap("decode", attn.decode))
    runner.sampler = wrap("sampler", runner.sampler)


def test_full_size_steps_cover_what_a_real_generate_runs(tiny_qwen3):
    llm = LLM(tiny_qwen3, backend="cpu_ref", max_num_batched_tokens=256, max_model_len=128, max_num_seqs=8,
              num_kvcache_blocks=64, enforce_eager=True)
    runner = llm.engine.runner
    free_before = len(llm.engine.scheduler.block_manager.free_block_ids)
    calls = []
    record_calls(runner, calls)
    warm_up_kernels(runner)
    assert warm_up_full_steps(runner) == [256, 256 - 16]  # lengths 86, 85, 85; then the first after 16 cached
    warm = {(op, s) for op, s, _ in calls}

    # a full-size prefix-free prefill that stores every token, and a full-size paged one, each sampled
    stores = [args for op, _, args in calls if op == "store" and args[0].shape[0] == 256]
    assert stores and all(bool((args[4] >= 0).all()) for args in stores)
    prefills = [args[5] for op, _, args in calls if op == "prefill"]
    assert any(m.block_tables is None and int(m.cu_seqlens_q[-1]) == 256 for m in prefills)
    # the paged step holds prefix-free sequences beside the continued one, as a step of new prompts does
    assert any(m.block_tables is not None and int(m.cu_seqlens_q[-1]) == 240 and m.prefix_free_tokens == 170
               for m in prefills)
    assert any(op == "sampler" and args[0].shape[0] == 3 for op, _, args in calls)
    # the warm-up borrowed cache blocks only: the block manager and the prefix cache never saw them
    assert len(llm.engine.scheduler.block_manager.free_block_ids) == free_before

    calls.clear()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (int(n),), generator=g).tolist() for n in (100, 90, 70, 60, 33, 17)]
    prompts.append(prompts[0][:64] + [1, 2, 3])  # a cached prefix: the paged prefill
    outputs = llm.generate(prompts, SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert all(len(o["token_ids"]) == 6 for o in outputs)
    real = {(op, s) for op, s, _ in calls}
    assert {op for op, _ in real} >= {"store", "prefill", "decode", "sampler"}
    assert real <= warm, f"kernel variants first met after the warm-up: {real - warm}"


def test_start_up_warm_up_reads_no_uninitialised_cache(tiny_qwen3):
    """The start-up warm-up's paged prefill reads a cached prefix it computed first, not what the fresh cache memory
    holds: with every cache filled with NaN beforehand, the sampled logits are finite."""
    llm = LLM(tiny_qwen3, backend="cpu_ref", max_model_len=128, max_num_seqs=8, num_kvcache_blocks=64,
              enforce_eager=True)
    runner = llm.engine.runner
    for attn in runner.attention_layers:
        attn.k_cache.fill_(float("nan")), attn.v_cache.fill_(float("nan"))
    sampled = []
    sampler = runner.sampler
    runner.sampler = lambda logits, params: sampled.append(logits.clone()) or sampler(logits, params)
    warm_up_kernels(runner)
    assert len(sampled) == 2 and all(bool(torch.isfinite(x).all()) for x in sampled)


@pytest.mark.parametrize("max_model_len,max_tokens,want_chunk", [
    (1500, 1024, 1500 - 480), (4000, 256, 4000 - 3744), (1024, 1024, 0), (3000, 16, 0), (3000, 40, 3000 - 2960)])
def test_the_longest_context_chunk_reads_only_computed_cache(tiny_qwen3, max_model_len, max_tokens, want_chunk):
    """One chunk at the end of a max_model_len - 1 context (kernels may pick tiles by the longest context), even
    when the full-size steps cannot run; with every cache filled with NaN first, its sampled logits are finite, so
    every position it attends to holds K/V it computed. No context longer than TOKENS_PER_SEQ: nothing runs."""
    llm = LLM(tiny_qwen3, backend="cpu_ref", max_num_batched_tokens=max_tokens, max_model_len=max_model_len + 1,
              max_num_seqs=8, num_kvcache_blocks=260, enforce_eager=True)
    runner = llm.engine.runner
    for attn in runner.attention_layers:
        attn.k_cache.fill_(float("nan")), attn.v_cache.fill_(float("nan"))
    calls, sampled = [], []
    record_calls(runner, calls)
    sampler = runner.sampler
    runner.sampler = lambda logits, params: sampled.append(logits.clone()) or sampler(logits, params)
    free_before = len(llm.engine.scheduler.block_manager.free_block_ids)
    assert warm_up_longest_context(runner) == (max_model_len if want_chunk else 0)
    if not want_chunk:
        assert not sampled
        return
    meta = [args[5] for op, _, args in calls if op == "prefill"][0]
    assert meta.max_seqlen_k == max_model_len and meta.max_seqlen_q == want_chunk and meta.block_tables is not None
    assert len(sampled) == 1 and bool(torch.isfinite(sampled[0]).all())
    assert len(llm.engine.scheduler.block_manager.free_block_ids) == free_before
