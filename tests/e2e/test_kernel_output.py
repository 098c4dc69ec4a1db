"""A kernel's bad output (token ids outside the vocabulary, a wrong dtype or shape) is caught where it enters the
engine, with an error naming the kernel and its plugin; recovery then leaves the engine idle and usable."""
import types

import pytest
import torch

import nanovllm
from nanovllm import LLM, SamplingParams
from nanovllm.backends.cpu_ref import plugin as cpu_ref
from nanovllm.core import engine as engine_module
from nanovllm.core import sampler as reference_sampler
from nanovllm.core.plugins import load_plugins

OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=32, max_model_len=128)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10]]


def negative_ids(logits, params):
    return torch.full((logits.shape[0],), -1, dtype=torch.int64)


def past_the_vocabulary(logits, params):
    return torch.full((logits.shape[0],), 10**6, dtype=torch.int64)


def float_ids(logits, params):
    return reference_sampler.sample(logits, params).float()


def one_id_too_many(logits, params):
    return torch.zeros(logits.shape[0] + 1, dtype=torch.int64)


def not_a_tensor(logits, params):
    return [0] * logits.shape[0]


def half_the_heads(q, k, v, k_cache, v_cache, meta, scale):
    return torch.zeros(q.shape[0], q.shape[1] // 2, q.shape[2], dtype=q.dtype)


def as_float16(q, k_cache, v_cache, meta, scale):
    return torch.zeros_like(q, dtype=torch.float16)


def only_q(positions, q, k, cos_sin_cache, q_weight, k_weight, eps):
    return q


def no_halving(x):
    return x.clone()


def only_the_sum(x, residual, weight, eps):
    return x + residual


BROKEN = {"sampler": [negative_ids, past_the_vocabulary, float_ids, one_id_too_many, not_a_tensor],
          "attention.prefill": [half_the_heads], "attention.decode": [as_float16], "rotary.qk": [only_q],
          "act.silu_mul": [no_halving], "norm.add_rms": [only_the_sum]}


@pytest.fixture
def with_broken_kernels(monkeypatch):
    """A third-party plugin `acme` adding the broken kernels to backend cpu_ref."""
    def register(registry):
        for op, fns in BROKEN.items():
            for fn in fns:
                registry.register(op, "cpu_ref", fn.__name__, fn)
    acme = types.ModuleType("acme")
    acme.NANOVLLM_PLUGIN_API = (1, 0)
    acme.nanovllm_register_kernels = nanovllm.hookimpl(register)
    monkeypatch.setattr(engine_module, "load_plugins",
                        lambda: load_plugins(modules={"cpu_ref": cpu_ref, "acme": acme}))


CASES = [("sampler", negative_ids, r"token id -1, outside the vocabulary \[0, 512\)"),
         ("sampler", past_the_vocabulary, r"token id 1000000, outside the vocabulary"),
         ("sampler", float_ids, r"shape \(\d,\) torch.float32; expected \(\d,\) int64 token ids"),
         ("sampler", one_id_too_many, r"shape \(3,\) torch.int64; expected \(2,\)"),
         ("sampler", not_a_tensor, r"a list, not a tensor of token ids"),
         ("attention.prefill", half_the_heads, r"shape \(\d+, 2, 48\) torch.float32; expected \(\d+, 4, 48\)"),
         ("rotary.qk", only_q, r"a Tensor, not a pair of tensors \(q, k\)"),
         ("act.silu_mul", no_halving, r"shape \(\d+, 768\) torch.float32; expected \(\d+, 384\) torch.float32"),
         ("norm.add_rms", only_the_sum, r"a Tensor, not a pair of tensors \(normed, sum\)"),
         ("attention.decode", as_float16, r"shape \(\d+, 4, 48\) torch.float16; expected \(\d+, 4, 48\) torch.float32")]


@pytest.mark.parametrize("op, fn, message", CASES, ids=[c[1].__name__ for c in CASES])
def test_bad_kernel_output_is_caught_at_start_naming_kernel_and_plugin(tiny_qwen3, with_broken_kernels, op, fn,
                                                                         message):
    """The start-up warm-up runs every kernel once, so a broken one is refused before any request."""
    label = rf"kernel cpu_ref/{fn.__name__} \(plugin acme\) for {op} returned "
    with pytest.raises(RuntimeError, match=label + message):
        LLM(tiny_qwen3, kernels={op: fn.__name__}, **OPTIONS)


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("fn", [negative_ids, float_ids, one_id_too_many], ids=lambda f: f.__name__)
def test_bad_sampler_output_mid_run_is_caught_and_recovered(tiny_qwen3, fn, stream):
    """A sampler that turns bad after start-up (the adversarial case: -1 under stream once broke the clean-up in
    the detokenizer, leaving a request running and a block leaked)."""
    llm = LLM(tiny_qwen3, **OPTIONS)
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    good, llm.engine.runner.sampler = llm.engine.runner.sampler, fn
    with pytest.raises(RuntimeError, match=r"kernel cpu_ref/torch \(plugin cpu_ref[^)]*\) for sampler returned"):
        if stream:
            list(llm.stream(PROMPTS, GREEDY))
        else:
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    scheduler = llm.engine.scheduler
    assert not scheduler.waiting and not scheduler.running
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    scheduler.block_manager.check_invariants([])
    llm.engine.runner.sampler = good
    assert llm.generate(PROMPTS, GREEDY, use_tqdm=False) == expected
