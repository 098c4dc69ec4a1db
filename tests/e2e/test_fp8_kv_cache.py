"""FP8 KV cache on the reference backend: options, refusals, calibrated scales, prefix cache, and accuracy.

The accuracy bounds on SmolLM2 sit above the figures measured with `benchmarks/kv_accuracy.py` (README,
"FP8 KV cache"), so a change that degrades FP8 accuracy fails here.
"""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main as cli_main
from nanovllm.core.kv_calibration import HEADROOM
from nanovllm.core.runner_setup import bytes_per_block
from nanovllm.testing.kv_accuracy import compare_kv_caches
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SMALL = dict(backend="cpu_ref", num_kvcache_blocks=128, kvcache_block_size=16, max_model_len=512)


def test_bad_kv_cache_options_are_refused(tiny_qwen3):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' is invalid: expected one of 'auto', 'fp8'"):
        LLM(tiny_qwen3, kv_cache_dtype="int8", **SMALL)
    with pytest.raises(ValueError, match=r"kv_cache_scale='dynamic' is invalid: expected one of 'per_head'"):
        LLM(tiny_qwen3, kv_cache_dtype="fp8", kv_cache_scale="dynamic", **SMALL)


def test_mps_refuses_fp8_naming_what_it_supports(tiny_qwen3):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' is not supported by backend 'mps', which supports "
                                         r"'auto': use one of those, or a backend that has it \(.*cpu_ref"):
        LLM(tiny_qwen3, backend="mps", device="cpu", kv_cache_dtype="fp8", num_kvcache_blocks=64)


@pytest.mark.parametrize("kv_cache_dtype,storage", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_cache_holds_one_byte_values_with_calibrated_scales(tiny_qwen3, kv_cache_dtype, storage):
    llm = LLM(tiny_qwen3, kv_cache_dtype=kv_cache_dtype, kv_cache_scale="per_head", **SMALL)
    runner = llm.engine.runner
    attn = runner.attention_layers[0]
    assert attn.k_cache.dtype == storage and bytes_per_block(runner) == 2 * 2 * 16 * 2 * 48  # layers, K+V, rows..
    scales = runner.kv_scales
    assert scales.shape == (2, 2, 2) and (scales > 0).all() and not torch.equal(scales, torch.ones_like(scales))
    assert attn.kv_scales[0].data_ptr() == scales[0, 0].data_ptr()  # the layer reads the runner's tensor
    assert "KV cache " + str(storage).removeprefix("torch.") in llm.kernel_plan().table()
    out = llm.generate(random_prompts(3, 512, (5, 40), seed=1), GREEDY, use_tqdm=False)
    assert all(len(o["token_ids"]) == 12 for o in out)
    # the calibration's amax lands at 1/HEADROOM of the FP8 range: stored values use the range, rarely saturate
    stored = attn.k_cache.float().abs().nan_to_num(0)
    assert stored.max() > torch.finfo(storage).max / HEADROOM / 8


def test_scale_methods(tiny_qwen3):
    per_tensor = LLM(tiny_qwen3, kv_cache_dtype="fp8", kv_cache_scale="per_tensor", **SMALL).engine.runner.kv_scales
    per_head = LLM(tiny_qwen3, kv_cache_dtype="fp8", kv_cache_scale="per_head", **SMALL).engine.runner.kv_scales
    unit = LLM(tiny_qwen3, kv_cache_dtype="fp8", kv_cache_scale="unit", **SMALL).engine.runner.kv_scales
    assert torch.equal(unit, torch.ones_like(unit))
    assert torch.equal(per_tensor, per_head.amax(-1, keepdim=True).expand_as(per_head))
    assert not torch.equal(per_head, per_tensor)


def test_fp8_prefix_cache_gives_the_tokens_of_an_uncached_run(tiny_qwen3):
    prefix = random_prompts(1, 512, (40, 40), seed=4)[0]
    prompts = [prefix + t for t in random_prompts(3, 512, (3, 20), seed=5)]
    llm = LLM(tiny_qwen3, kv_cache_dtype="fp8", **SMALL)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    bm = llm.engine.scheduler.block_manager
    hits = bm.num_prefix_hit_tokens
    cached = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert bm.num_prefix_hit_tokens - hits >= 3 * 32
    fresh = LLM(tiny_qwen3, kv_cache_dtype="fp8", **SMALL)
    uncached = fresh.generate(prompts, GREEDY, use_tqdm=False)
    assert fresh.engine.scheduler.block_manager.num_prefix_hit_tokens == 0
    # an uncached prefill attends to this step's unquantised K/V, a cached one reads the prefix back from the
    # FP8 cache: the first tokens agree, later ones may part (the tiny random model has many near-ties)
    assert all(len(o["token_ids"]) == 12 for o in cached)
    assert [o["token_ids"][:2] for o in cached] == [o["token_ids"][:2] for o in uncached]


def test_cli_plan_shows_the_kv_cache_dtype(capsys):
    assert cli_main(["backends", "--plan", "--backend", "cpu_ref", "--kv-cache-dtype", "fp8"]) == 0
    assert "KV cache float8_e4m3fn" in capsys.readouterr().out


SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a short poem about the sea.",
                   "Once upon a time, in a small village,"]


def test_fp8_accuracy_on_smollm2():
    """Default FP8 (e4m3, per-head calibrated) against the float32 cache: 4 prompts x 64 tokens."""
    options = dict(backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256, max_num_batched_tokens=256)
    reference = LLM(**options)
    candidate = LLM(kv_cache_dtype="fp8", **options)
    prompts = [reference.tokenizer.encode(p) for p in SMOLLM2_PROMPTS]
    result = compare_kv_caches(reference, candidate, prompts, max_tokens=64)
    assert result.positions == 4 * 63
    # measured: 0.041 mean, 0.965 top-1, greedy prefix 0.16 (per position 3.5% of top-1 choices flip, so
    # greedy runs part after ~30 tokens on average, with a wide spread over 4 prompts)
    assert result.mean_abs_logprob_diff < 0.06, result
    assert result.top1_agreement > 0.93, result
    assert result.greedy_prefix > 0.05, result
