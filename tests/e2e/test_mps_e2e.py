"""The mps backend end to end on CPU tensors (device="cpu"): the same greedy tokens as cpu_ref and HF."""
import pytest
import torch

from nanovllm import LLM
from nanovllm.backends.mps import attention
from tests.conftest import debug_messages
from tests.e2e.hf_reference import PREEMPTION_MAX_TOKENS, hf_greedy, load_hf, preemption_workload



def test_greedy_tokens_equal_cpu_ref_and_hf_under_preemption(tiny_qwen3):
    """A 14-block cache and 64-token steps force chunked prefill, preemption and prefix-cache hits."""
    hf = load_hf(tiny_qwen3)
    prompts, options, params = preemption_workload(hf.config.vocab_size)
    tokens, messages = {}, {}
    for backend, device in (("mps", "cpu"), ("cpu_ref", None)):
        llm = LLM(tiny_qwen3, backend=backend, device=device, **options)
        with debug_messages(attention.__name__) as messages[backend]:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0, f"{backend}: the budget did not force preemption"
        tokens[backend] = [out["token_ids"] for out in outputs]
    cases = {m.split(":")[0] for m in messages["mps"]}
    assert cases == {"mps attention prefill", "mps attention paged prefill", "mps attention decode"}
    assert tokens["mps"] == tokens["cpu_ref"]
    assert tokens["mps"] == [hf_greedy(hf, prompt, PREEMPTION_MAX_TOKENS) for prompt in prompts]


def test_cpu_device_uses_mps_kernels_float32_and_default_budget(tiny_qwen3):
    llm = LLM(tiny_qwen3, backend="mps", device="cpu")
    runner = llm.engine.runner
    assert runner.num_blocks == 1024
    assert runner.dtype == torch.float32 and runner.device == torch.device("cpu")
    for op, choice in llm.engine.kernel_plan.choices.items():
        # mps has no fused elementwise kernels: those ops run the reference (torch) code, as before they were ops
        expected = "cpu_ref" if op in ("rotary.qk", "act.silu_mul", "rotary.qk_store", "norm.add_rms") else "mps"
        assert choice.impl.backend == expected, f"{op} resolved to {choice.impl.backend}/{choice.impl.name}"
    # no fused q/k + store kernel on mps: the model runs rotary.qk then mps's own store, and the plan says so
    assert not llm.engine.kernel_plan.calls("rotary.qk_store")
    assert "not called: the model runs rotary.qk, then kv_cache.store" in llm.engine.kernel_plan.table()


def test_budget_too_small_for_one_sequence_is_refused(tiny_qwen3):
    with pytest.raises(ValueError, match=r"budget of 8 blocks.*\(16 blocks needed\)"):
        LLM(tiny_qwen3, backend="mps", device="cpu", num_kvcache_blocks=8, max_model_len=256)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_device_without_apple_gpu_says_not_available_and_lists_backends(tiny_qwen3):
    with pytest.raises(RuntimeError, match="not available on this machine") as info:
        LLM(tiny_qwen3, backend="mps")
    assert "MPS is not available" in str(info.value) and "cpu_ref (available)" in str(info.value)


def test_tensor_parallelism_is_refused(tiny_qwen3):
    with pytest.raises(RuntimeError, match="the mps backend does not support tensor parallelism"):
        LLM(tiny_qwen3, backend="mps", device="cpu", tensor_parallel_size=2)
