"""The cpu backend end to end: in float32 the same greedy tokens as cpu_ref and HF, through chunked prefill,
preemption and prefix-cache hits; its dtype, threads and KV budget as an engine sees them."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.backends.cpu.plugin import native_bfloat16
from tests.conftest import random_prompts
from tests.e2e.hf_reference import PREEMPTION_MAX_TOKENS, hf_greedy, load_hf, preemption_workload



def test_greedy_tokens_equal_cpu_ref_and_hf_under_preemption(tiny_qwen3):
    """A 14-block cache and 64-token steps force chunked prefill, preemption and prefix-cache hits."""
    hf = load_hf(tiny_qwen3)
    prompts, options, params = preemption_workload(hf.config.vocab_size)
    options["dtype"] = "float32"
    tokens = {}
    for backend in ("cpu", "cpu_ref"):
        llm = LLM(tiny_qwen3, backend=backend, **options)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0, f"{backend}: the budget did not force preemption"
        tokens[backend] = [out["token_ids"] for out in outputs]
    assert tokens["cpu"] == tokens["cpu_ref"]
    assert tokens["cpu"] == [hf_greedy(hf, prompt, PREEMPTION_MAX_TOKENS) for prompt in prompts]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_qwen3):
    llm = LLM(tiny_qwen3, backend="cpu", num_kvcache_blocks=64, max_model_len=256)
    prompts = random_prompts(4, 512, (5, 30), seed=1)
    seeded = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=7, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded, use_tqdm=False)[0]["token_ids"]
    batched = llm.generate(prompts, [seeded, other, other, other], use_tqdm=False)[0]["token_ids"]
    assert alone == batched


def test_engine_runs_cpu_kernels_in_the_default_dtype(tiny_qwen3):
    llm = LLM(tiny_qwen3, num_kvcache_blocks=64, max_model_len=256)  # no backend named: cpu comes before cpu_ref
    assert llm.engine.backend.name == "cpu"
    assert llm.engine.runner.dtype == (torch.bfloat16 if native_bfloat16() else torch.float32)
    plan = llm.engine.kernel_plan
    for op, choice in plan.choices.items():  # the fused rotary.qk_store has no cpu kernel: its cpu parts run
        assert choice.impl.backend == "cpu" or not plan.calls(op), f"{op} resolved to {choice.impl.full_name}"
    assert not plan.calls("rotary.qk_store")
    assert LLM(tiny_qwen3, backend="cpu", dtype="float32", max_model_len=256).engine.runner.dtype == torch.float32


def test_threads_option_sets_torch_threads(tiny_qwen3):
    before = torch.get_num_threads()
    try:
        LLM(tiny_qwen3, backend="cpu", threads=1, max_model_len=256)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads=0 is invalid"):
        LLM(tiny_qwen3, backend="cpu", threads=0)


def test_kv_budget_is_what_max_num_seqs_sequences_need(tiny_qwen3):
    llm = LLM(tiny_qwen3, backend="cpu", max_model_len=256, max_num_seqs=4)
    assert llm.engine.runner.num_blocks == 4 * 256 // 16
    assert LLM(tiny_qwen3, backend="cpu", max_model_len=256, max_num_seqs=4).engine.runner.num_blocks == 64
