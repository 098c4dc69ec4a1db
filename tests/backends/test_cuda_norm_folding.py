"""The cuda backend's folded RMSNorms (backends/cuda/norm_folding.py) against the unfolded model.

On a machine without CUDA the fold runs inside cpu_ref engines in float32, its two Triton kernels under Triton's
interpreter: the same engine generates before and after folding, through prefills, decode steps, chunked prefills
mixed with decode, prefix-cache hits, and an FP8 KV cache. On a GPU the cuda engine folds by default, and
tests/backends/test_cuda_e2e.py compares it with cpu_ref.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the interpreter must be on before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.testing.tiny_models import make_tiny_model  # noqa: E402
from tests.backends.test_cuda_kernels import _cpu_skip_reason  # noqa: E402
from tests.conftest import random_prompts  # noqa: E402
from tests.e2e.test_hf_parity import prefill_logits  # noqa: E402

pytestmark = pytest.mark.skipif(HAS_CUDA or bool(_cpu_skip_reason()),
                                reason=_cpu_skip_reason() or "with CUDA the cuda engine folds (test_cuda_e2e.py)")

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {arch: make_tiny_model(str(tmp_path_factory.mktemp(f"fold_{arch}")), arch, head_dim=64)
            for arch in ("qwen3", "llama")}


def engine(path, **options):
    return LLM(path, backend="cpu_ref", dtype="float32", num_kvcache_blocks=64, max_model_len=512, max_num_seqs=8,
               **options)


def with_cuda_kernels(llm):
    """The cuda backend's Triton q/k norm + rotary + store, SiLU-and-mul and add + RMSNorm in the engine's layers
    (interpreted), as a cuda engine's plan gives them: then its model passes `fold_norms`'s checks."""
    from nanovllm.backends.cuda import kernels
    for layer in llm.engine.runner.model.model.layers:
        layer.self_attn.rotary_qk_store = kernels.triton_rotary_qk_store
        layer.mlp.act_fn.kernel = kernels.triton_silu_mul
        layer.input_layernorm.add_kernel = layer.post_attention_layernorm.add_kernel = kernels.triton_add_rms_norm
    return llm


def fold_engine(llm):
    from nanovllm.backends.cuda.norm_folding import fold_norms
    assert fold_norms(with_cuda_kernels(llm).engine.runner.model) == ""
    return llm


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_folded_model_generates_the_unfolded_tokens(models, arch):
    """Chunked prefills (24 tokens a step) run beside decode steps, and the second round hits the prefix cache."""
    prompts = random_prompts(5, 512, (3, 40), seed=3)
    llm = engine(models[arch], max_num_batched_tokens=24)
    want = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    fold_engine(llm)
    for _ in range(2):
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want


def test_folded_logits_match_in_float32(models):
    prompts = random_prompts(3, 512, (5, 30), seed=4)
    want = prefill_logits(engine(models["qwen3"]), prompts)
    got = prefill_logits(fold_engine(engine(models["qwen3"])), prompts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_folded_model_with_an_fp8_cache(models):
    """The calibration prefill sees the scaled K and V (its hook reads the attention's inputs), and the folded
    kernels quantise what the unfolded ones quantise. Both sides run the Triton kernels: the interpreter casts
    float32 to FP8 differently from torch near powers of two (e.g. 127.4 -> 64), which only a GPU does right."""
    prompts = random_prompts(3, 512, (5, 30), seed=5)
    unfolded = with_cuda_kernels(engine(models["qwen3"], kv_cache_dtype="fp8"))
    folded = fold_engine(engine(models["qwen3"], kv_cache_dtype="fp8"))
    logprobs = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    want, got = (llm.generate(prompts, logprobs, use_tqdm=False) for llm in (unfolded, folded))
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    # float32 products of folded weights differ from the unfolded ones in the last bit, which moves ~1 in 10^4
    # stored FP8 values by one FP8 step (measured on this prompt set): log-probabilities then move by < 1e-2
    for a, b in zip(want, got):
        assert max(abs(x[t] - y[t]) for x, y, t in zip(a["logprobs"], b["logprobs"], a["token_ids"])) < 2e-2


def test_fold_refused_where_it_does_not_apply(models, tmp_path):
    from nanovllm.backends.cuda.norm_folding import fold_norms
    model = engine(models["qwen3"]).engine.runner.model
    assert fold_norms(model).startswith("the plan's rotary.qk_store is not cuda/triton itself")  # cpu_ref's kernels
    biased = make_tiny_model(str(tmp_path / "biased"), "llama", head_dim=64, attention_bias=True)
    assert fold_norms(with_cuda_kernels(engine(biased)).engine.runner.model) == "the model's products have biases"
    assert fold_norms(torch.nn.Linear(2, 2)) == "Linear is not a decoder of models/decoder.py"
    folded = fold_engine(engine(models["llama"])).engine.runner.model
    assert fold_norms(folded).startswith("its forward was replaced already")  # never folded twice
