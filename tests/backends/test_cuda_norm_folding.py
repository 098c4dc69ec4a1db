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
    """The cuda backend's Triton q/k norm + rotary + store, paged decode, SiLU-and-mul and add + RMSNorm in the
    engine's layers (interpreted), as a cuda engine's plan gives them: then its model passes `fold_norms`'s
    checks, and its decode steps may take the fused decode kernel."""
    from nanovllm.backends.cuda import kernels
    for layer in llm.engine.runner.model.model.layers:
        layer.self_attn.rotary_qk_store = kernels.triton_rotary_qk_store
        layer.self_attn.attn.decode = kernels.triton_paged_decode
        layer.mlp.act_fn.kernel = kernels.triton_silu_mul
        layer.input_layernorm.add_kernel = layer.post_attention_layernorm.add_kernel = kernels.triton_add_rms_norm
    return llm


def fold_engine(llm, fuse_decode: bool = True):
    from nanovllm.backends.cuda.norm_folding import fold_norms
    model = with_cuda_kernels(llm).engine.runner.model
    assert fold_norms(model, fuse_decode) == ("", "" if fuse_decode else "the fused_decode option is off")
    assert model.model.fuse_decode == fuse_decode
    return llm


@pytest.mark.parametrize("arch,fuse_decode", [("qwen3", True), ("llama", True), ("qwen3", False)])
def test_folded_model_generates_the_unfolded_tokens(models, arch, fuse_decode):
    """Chunked prefills (24 tokens a step) run beside decode steps, and the second round hits the prefix cache;
    with `fuse_decode` the pure decode steps take the fused decode kernel."""
    prompts = random_prompts(5, 512, (3, 40), seed=3)
    llm = engine(models[arch], max_num_batched_tokens=24)
    want = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    fold_engine(llm, fuse_decode)
    for _ in range(2):
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want


def test_fused_decode_steps_take_the_fused_kernel(models, monkeypatch):
    """Decode steps (and only they) go through `fused_decode`, which runs its own kernel at these shapes; the
    logprobs of the generated tokens match the unfolded engine's."""
    from nanovllm.backends.cuda import norm_folding
    from nanovllm.backends.cuda.attention import triton_decode_fused
    calls = []

    def counted(positions, q, *args, **kwargs):
        calls.append((q.shape[0], triton_decode_fused.fused_plan(q, args[6]) is not None))
        return triton_decode_fused.fused_decode(positions, q, *args, **kwargs)
    monkeypatch.setattr(norm_folding, "fused_decode", counted)
    prompts = random_prompts(3, 512, (5, 30), seed=6)
    logprobs = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
    want = engine(models["qwen3"]).generate(prompts, logprobs, use_tqdm=False)
    got = fold_engine(engine(models["qwen3"])).generate(prompts, logprobs, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    for a, b in zip(want, got):
        assert max(abs(x[t] - y[t]) for x, y, t in zip(a["logprobs"], b["logprobs"], a["token_ids"])) < 1e-4
    layers = len(engine(models["qwen3"]).engine.runner.model.model.layers)
    assert len(calls) == 4 * layers and all(n == 3 and fused for n, fused in calls)  # 4 decode steps of 3 rows


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
    why, why_not_fused = fold_norms(model)
    assert why.startswith("the plan's rotary.qk_store is not cuda/triton itself")  # cpu_ref's kernels
    assert why_not_fused == "the norms are not folded"
    biased = make_tiny_model(str(tmp_path / "biased"), "llama", head_dim=64, attention_bias=True)
    assert fold_norms(with_cuda_kernels(engine(biased)).engine.runner.model)[0] == "the model's products have biases"
    assert fold_norms(torch.nn.Linear(2, 2))[0] == "Linear is not a decoder of models/decoder.py"
    folded = fold_engine(engine(models["llama"])).engine.runner.model
    assert fold_norms(folded)[0].startswith("its forward was replaced already")  # never folded twice
    reference_decode = with_cuda_kernels(engine(models["qwen3"]))
    for layer in reference_decode.engine.runner.model.model.layers:
        layer.self_attn.attn.decode = engine(models["qwen3"]).engine.runner.model.model.layers[0].self_attn.attn.decode
    model = reference_decode.engine.runner.model
    assert fold_norms(model) == ("", "the plan's attention.decode is not cuda/triton_paged itself (the reference, "
                                     "another kernel, or a verification wrapper)")
    assert model.model.fuse_decode is False
