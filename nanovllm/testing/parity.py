"""The parity harness: every kernel a backend registers, checked against cpu_ref's twin on random inputs.

For plugin authors as much as for us. In a test suite:

    from nanovllm.core.plugins import load_plugins
    from nanovllm.testing.parity import parity_cases, check_kernel_parity

    @pytest.mark.parametrize("cell", list(parity_cases(load_plugins(), backends=["my_backend"])), ids=str)
    def test_parity(cell):
        if cell.skip_reason:
            pytest.skip(cell.skip_reason)
        check_kernel_parity(cell.backend, cell.impl)

Each check builds fresh random inputs on the backend's device (`Backend.device`), runs the reference and
the kernel on separate copies, and raises AssertionError naming the kernel, the case and what differed.
Outputs the kernel writes in place (the KV cache) start poisoned with NaN; the cache rows no sequence
owns stay NaN, so reading past a context shows up as NaN.
"""
from dataclasses import dataclass
from typing import Iterator

import torch

from nanovllm.backends.cpu_ref import attention as ref_attention
from nanovllm.backends.cpu_ref import elementwise as ref_elementwise
from nanovllm.core import kv_store as ref_kv_store
from nanovllm.core import sampler as ref_sampler
from nanovllm.core.backend import Backend
from nanovllm.core.config import EngineConfig
from nanovllm.core.kv_quant import KV_CACHE_DTYPES
from nanovllm.core.plugins import backend_availability
from nanovllm.core.registry import OPS, KernelImpl, KernelQuery
from nanovllm.core.startup import backend_reasons
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata
from nanovllm.testing.layouts import DEFAULT_CASES, TOLERANCES, ParityCase, PagedLayout, nan_like, random_layout

REFERENCE = {
    "kv_cache.store": ref_kv_store.store_kvcache,
    "attention.prefill": ref_attention.prefill_attention,
    "attention.decode": ref_attention.decode_attention,
    "sampler": ref_sampler.sample,
    "rotary.qk": ref_elementwise.rotary_qk,
    "act.silu_mul": ref_elementwise.silu_mul,
    "rotary.qk_store": ref_elementwise.rotary_qk_store,
    "norm.add_rms": ref_elementwise.add_rms_norm,
}


@dataclass(frozen=True)
class ParityCell:
    """One cell of the backends x kernels matrix; `skip_reason` is None when it can be checked here."""
    backend: Backend | None
    backend_name: str
    op: str
    impl: KernelImpl
    skip_reason: str | None

    def __str__(self) -> str:
        return f"{self.backend_name}-{self.op}-{self.impl.name}"


def backend_device(backend: Backend) -> torch.device:
    """The device the backend runs on by default, as the engine would ask for it."""
    return backend.device(EngineConfig(model=""))


def case_reasons(backend: Backend, impl: KernelImpl, case: ParityCase) -> list[str]:
    """Why `impl` cannot serve `case` on `backend` (empty: it can)."""
    reasons = backend_reasons(backend, case.dtype, case.block_size)
    if case.kv_cache_dtype is not None:
        names = [name for name, dtype in KV_CACHE_DTYPES.items() if dtype == case.kv_cache_dtype]
        if not set(names) & set(backend.kv_cache_dtypes):
            reasons.append(f"backend {backend.name!r} has no {case.kv_cache_dtype} KV cache")
    query = KernelQuery(backend.device_type, case.dtype, case.head_dim, case.num_heads, case.num_kv_heads,
                        case.block_size, case.kv_cache_dtype)
    return reasons + impl.reasons(query)


def parity_cases(plugins, backends: list[str] | None = None,
                 cases: tuple[ParityCase, ...] = DEFAULT_CASES) -> Iterator[ParityCell]:
    """Every registered kernel of every backend (or of `backends`), with the reason it cannot be checked here."""
    names = set(plugins.backends) | {i.backend for impls in plugins.registry.impls.values() for i in impls}
    for name in sorted(names if backends is None else set(backends)):
        backend = plugins.backends.get(name)
        if backend is None:
            why = f"{name}: no installed plugin offers this backend"
        else:
            ok, reason = backend_availability(backend)
            why = None if ok else f"{name}: {reason}"
        for op in OPS:
            for impl in plugins.registry.candidates(op, name):
                skip = why
                if skip is None:
                    rejected = [f"[{case}] {'; '.join(r)}" for case in cases if (r := case_reasons(backend, impl, case))]
                    if len(rejected) == len(cases):
                        skip = f"{name}/{impl.name}: its check rejects every parity case: " + " | ".join(rejected)
                yield ParityCell(backend, name, op, impl, skip)


def check_kernel_parity(backend: Backend, impl: KernelImpl, cases: tuple[ParityCase, ...] = DEFAULT_CASES) -> int:
    """Check `impl` against the reference on every case it accepts; returns how many cases ran."""
    device = backend_device(backend)
    ran = 0
    for case in cases:
        if not case_reasons(backend, impl, case):
            check_kernel(impl, case, device)
            ran += 1
    return ran


def check_kernel(impl: KernelImpl, case: ParityCase, device: torch.device) -> None:
    """One kernel, one case: raises AssertionError naming the kernel and the case when it differs."""
    if impl.op not in CHECKS:
        raise ValueError(f"no parity check for op {impl.op!r}; known ops: {', '.join(CHECKS)}")
    generator = torch.Generator().manual_seed(case.seed)
    for label, run in CHECKS[impl.op]:
        try:
            run(impl.fn, case, device, generator)
        except AssertionError as e:
            raise AssertionError(f"{impl.backend}/{impl.name} ({impl.op}, {label}) differs from cpu_ref "
                                 f"on [{case}]: {e}") from None
        except Exception as e:  # a crash is a parity failure too, reported the same way
            raise AssertionError(f"{impl.backend}/{impl.name} ({impl.op}, {label}) raised on [{case}]: "
                                 f"{type(e).__name__}: {e}") from e


def _expect_like(out, expected: torch.Tensor, what: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"{what}: returned {type(out).__name__}, expected a tensor")
    if out.shape != expected.shape:
        raise AssertionError(f"{what}: returned shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
    if out.dtype != expected.dtype:
        raise AssertionError(f"{what}: returned dtype {out.dtype}, expected {expected.dtype}")


def _close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    _expect_like(out, expected, what)
    assert_close(out, expected, *TOLERANCES[dtype], what)


def assert_close(out: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Elementwise |out - expected| <= atol + rtol * |expected|, NaN only where expected is NaN."""
    out, expected = out.detach().cpu().float(), expected.detach().cpu().float()
    ok = torch.isclose(out, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not ok.all():
        bad = (~ok).nonzero()
        first = tuple(bad[0].tolist())
        diff = (out - expected).abs().nan_to_num(float("inf"))[~ok].max().item()
        raise AssertionError(f"{what}: {len(bad)} of {out.numel()} elements differ (atol={atol}, rtol={rtol}); "
                             f"max abs diff {diff:.3g}; first at index {first}: {out[first].item()} "
                             f"vs reference {expected[first].item()}")


def check_kv_store(fn, case: ParityCase, device, generator) -> None:
    layout = random_layout(case, device, "prefill", generator)
    num_tokens = int(layout.slot_mapping.numel())
    slot_mapping = layout.slot_mapping.clone()
    slot_mapping[torch.randperm(num_tokens, generator=generator)[: num_tokens // 5].to(device)] = -1  # padding
    shape = (num_tokens, case.num_kv_heads, case.head_dim)
    magnitude = 100 if layout.kv_scales else 1  # FP8: some values beyond the range, which must saturate
    key = (magnitude * torch.randn(shape, generator=generator)).to(case.dtype).to(device)
    value = (magnitude * torch.randn(shape, generator=generator)).to(case.dtype).to(device)
    caches = {name: (nan_like(layout.k_cache), nan_like(layout.v_cache)) for name in ("ref", "kernel")}
    REFERENCE["kv_cache.store"](key, value, *caches["ref"], slot_mapping, *layout.kv_scales)
    fn(key, value, *caches["kernel"], slot_mapping, *layout.kv_scales)
    for i, what in enumerate(("k_cache", "v_cache")):
        out, expected = caches["kernel"][i], caches["ref"][i]
        _expect_like(out, expected, what)
        assert_close(out, expected, 0, 0, f"{what} after the store (slots < 0 must stay untouched)")


def prefill_inputs(layout: PagedLayout, case: ParityCase, device, generator, with_tables: bool):
    num_tokens = sum(layout.query_lens)
    q = torch.randn(num_tokens, case.num_heads, case.head_dim, generator=generator).to(case.dtype).to(device)
    k, v = layout.query_rows(layout.k_cache, case.dtype), layout.query_rows(layout.v_cache, case.dtype)
    cu_q = torch.tensor([0, *torch.tensor(layout.query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(layout.context_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    meta = PrefillMetadata(cu_q, cu_k, max(layout.query_lens), max(layout.context_lens),
                           layout.block_tables if with_tables else None)
    return q, k, v, meta


def _check_prefill(fn, case, device, generator, kind: str) -> None:
    layout = random_layout(case, device, kind, generator)
    q, k, v, meta = prefill_inputs(layout, case, device, generator, with_tables=kind == "chunked")
    scale = case.head_dim ** -0.5
    expected = REFERENCE["attention.prefill"](q, k, v, layout.k_cache, layout.v_cache, meta, scale, *layout.kv_scales)
    out = fn(q.clone(), k.clone(), v.clone(), layout.k_cache.clone(), layout.v_cache.clone(), meta, scale,
             *layout.kv_scales)
    _close_attention(out, expected, case, layout,
                     f"output for query lens {layout.query_lens}, context lens {layout.context_lens}")


def check_prefill_whole(fn, case, device, generator) -> None:
    _check_prefill(fn, case, device, generator, "prefill")


def check_prefill_chunked(fn, case, device, generator) -> None:
    _check_prefill(fn, case, device, generator, "chunked")


def check_decode(fn, case: ParityCase, device, generator) -> None:
    layout = random_layout(case, device, "decode", generator)
    q = torch.randn(case.num_seqs, case.num_heads, case.head_dim, generator=generator).to(case.dtype).to(device)
    context_lens = torch.tensor(layout.context_lens, dtype=torch.int32, device=device)
    meta = DecodeMetadata(context_lens, layout.block_tables, max(layout.context_lens))
    scale = case.head_dim ** -0.5
    expected = REFERENCE["attention.decode"](q, layout.k_cache, layout.v_cache, meta, scale, *layout.kv_scales)
    out = fn(q.clone(), layout.k_cache.clone(), layout.v_cache.clone(), meta, scale, *layout.kv_scales)
    _close_attention(out, expected, case, layout, f"output for context lens {layout.context_lens}")


def _close_attention(out, expected, case: ParityCase, layout: PagedLayout, what: str) -> None:
    """Attention outputs, compared in units of each head's V scale when the cache is FP8: an output row is a
    mix of V rows, so its rounding errors scale with them, and the dtype's tolerances are for unit-scale values
    (the FP8 layouts' values are ~8 x a scale of up to 3: in plain units an fp16 kernel's own rounding of the
    softmax weights, FlashAttention's included, would fail an absolute 2e-3)."""
    _expect_like(out, expected, what)
    if layout.kv_scales:
        per_head = layout.kv_scales[1].repeat_interleave(case.num_heads // case.num_kv_heads)[:, None]
        out, expected = out.float() / per_head, expected.float() / per_head
    assert_close(out, expected, *TOLERANCES[case.dtype], what)


def _random_logits(case: ParityCase, num_rows: int, vocab_size: int, generator) -> torch.Tensor:
    logits = 3 * torch.randn(num_rows, vocab_size, generator=generator)
    winners = torch.randint(0, vocab_size, (num_rows,), generator=generator)
    logits[torch.arange(num_rows), winners] = logits.max() + 1  # a unique argmax even in bfloat16
    return logits.to(case.dtype)


def check_sampler(fn, case: ParityCase, device, generator) -> None:
    num_rows, vocab_size = 8, 1000
    logits = _random_logits(case, num_rows, vocab_size, generator).to(device)
    greedy = ref_sampler.SamplingTensors(torch.zeros(num_rows, device=device), all_greedy=True)
    out = fn(logits.clone(), greedy)
    expected = REFERENCE["sampler"](logits, greedy)
    _expect_like(out, expected, "all-greedy token ids")
    if not torch.equal(out.cpu(), expected.cpu()):
        raise AssertionError(f"all-greedy token ids {out.tolist()} != reference {expected.tolist()}")

    temperatures = torch.tensor([0, 0.7, 0, 1.0, 1.3, 0, 0.9, 1.1], device=device)
    mixed = ref_sampler.SamplingTensors(
        temperatures, top_k=torch.tensor([0, 50, 0, 5, 0, 20, 0, 1], device=device),
        top_p=torch.tensor([1, 0.9, 1, 1, 0.5, 1, 0.8, 1], device=device),
        min_p=torch.tensor([0, 0, 0, 0.05, 0, 0, 0.1, 0], device=device))
    # flat logits on sampled rows, so a sampler that ignores a filter almost surely picks an excluded token
    is_greedy_row = (temperatures == 0).unsqueeze(-1)
    flat = torch.randn(num_rows, vocab_size, generator=generator).to(case.dtype).to(device)
    logits = torch.where(is_greedy_row, logits, flat)
    out = fn(logits.clone(), mixed)
    expected = REFERENCE["sampler"](logits, mixed)
    _expect_like(out, expected, "mixed-batch token ids")
    is_greedy = (temperatures == 0).cpu()
    if not torch.equal(out.cpu()[is_greedy], expected.cpu()[is_greedy]):
        raise AssertionError(f"greedy rows {is_greedy.nonzero().flatten().tolist()} got {out.cpu()[is_greedy].tolist()}, "
                             f"reference {expected.cpu()[is_greedy].tolist()}")
    scaled = logits.float() / temperatures.clamp_min(1e-6).unsqueeze(-1)
    allowed = ref_sampler.apply_top_k_top_p_min_p(scaled, mixed).isfinite().cpu()
    picked = allowed[torch.arange(num_rows), out.cpu().clamp(0, vocab_size - 1)] & (out.cpu() >= 0) & (out.cpu() < vocab_size)
    if not picked[~is_greedy].all():
        bad = (~picked & ~is_greedy).nonzero().flatten().tolist()
        raise AssertionError(f"rows {bad} sampled tokens {out.cpu()[bad].tolist()} that top-k/top-p/min-p exclude")


def check_rotary_qk(fn, case: ParityCase, device, generator) -> None:
    """q and k as views into one q/k/v projection output, with and without the per-head q/k norm."""
    num_tokens, heads, kv_heads, dim, max_position = 7, case.num_heads, case.num_kv_heads, case.head_dim, 64
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(case.dtype).to(device)
    q = qkv[:, :heads * dim].view(num_tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(num_tokens, kv_heads, dim)
    cos_sin_cache = torch.randn(max_position, dim, generator=generator).to(device)
    positions = torch.randint(0, max_position, (num_tokens,), generator=generator).to(device)
    weights = [(None, None), tuple(torch.randn(dim, generator=generator).to(case.dtype).to(device) for _ in "qk")]
    before = qkv.clone()
    for q_weight, k_weight in weights:
        expected = REFERENCE["rotary.qk"](positions, q, k, cos_sin_cache, q_weight, k_weight, 1e-6)
        out = fn(positions, q, k, cos_sin_cache, q_weight, k_weight, 1e-6)
        norm = "with q/k norm" if q_weight is not None else "without q/k norm"
        for got, want, what in zip(out, expected, ("q", "k")):
            _close(got, want, case.dtype, f"rotated {what} {norm}")
    assert_close(qkv, before, 0, 0, "q/k inputs after rotary.qk (they must not be modified)")


def check_rotary_qk_store(fn, case: ParityCase, device, generator) -> None:
    """q/k/v as views of one projection output, prefill- and decode-shaped, with and without the q/k norm, a fifth
    of the slots -1: q and k must match `rotary.qk`'s reference, and the caches hold exactly what `kv_cache.store`'s
    reference writes from the kernel's own rotated K and the V (only K rounding may differ, and it is checked
    above); return_k=False must write the same q and caches."""
    for kind in ("prefill", "decode"):
        layout = random_layout(case, device, kind, generator)
        num_tokens, heads, kv_heads, dim = int(layout.slot_mapping.numel()), case.num_heads, case.num_kv_heads, case.head_dim
        slot_mapping = layout.slot_mapping.clone()
        slot_mapping[torch.randperm(num_tokens, generator=generator)[: max(1, num_tokens // 5)].to(device)] = -1
        magnitude = 100 if layout.kv_scales else 1  # FP8: some values beyond the range, which must saturate
        qkv = (magnitude * torch.randn(num_tokens, (heads + 2 * kv_heads) * dim, generator=generator))
        qkv = qkv.to(case.dtype).to(device)
        q, k, v = qkv.view(num_tokens, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
        max_position = 64
        cos_sin_cache = torch.randn(max_position, dim, generator=generator).to(device)
        positions = torch.randint(0, max_position, (num_tokens,), generator=generator).to(device)
        weights = [(None, None), tuple(torch.randn(dim, generator=generator).to(case.dtype).to(device) for _ in "qk")]
        before = qkv.clone()
        for q_weight, k_weight in weights:
            what = f"{kind}-shaped ({num_tokens} tokens), {'with' if q_weight is not None else 'without'} q/k norm"
            rotary = (positions, q, k, v, cos_sin_cache, q_weight, k_weight, 1e-6)
            caches = {name: (nan_like(layout.k_cache), nan_like(layout.v_cache)) for name in ("ref", "kernel", "no_k")}
            out = fn(*rotary, *caches["kernel"], slot_mapping, True, *layout.kv_scales)
            expected = REFERENCE["rotary.qk"](positions, q, k, cos_sin_cache, q_weight, k_weight, 1e-6)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise AssertionError(f"{what}: returned {type(out).__name__}, expected a pair (q, k)")
            for got, want, name in zip(out, expected, ("q", "k")):
                _close(got, want, case.dtype, f"rotated {name}, {what}")
            REFERENCE["kv_cache.store"](out[1], v, *caches["ref"], slot_mapping, *layout.kv_scales)
            for i, name in enumerate(("k_cache", "v_cache")):
                assert_close(caches["kernel"][i], caches["ref"][i], 0, 0,
                             f"{name} after the store, {what} (slots < 0 must stay untouched)")
            if q_weight is None:
                continue  # return_k=False once per layout (each variant is a kernel compilation on a GPU)
            q_only, k_only = fn(*rotary, *caches["no_k"], slot_mapping, False, *layout.kv_scales)
            assert_close(q_only, out[0], 0, 0, f"q with return_k=False, {what}")
            if k_only is not None:
                _close(k_only, expected[1], case.dtype, f"k with return_k=False, {what}")
            for i, name in enumerate(("k_cache", "v_cache")):
                assert_close(caches["no_k"][i], caches["kernel"][i], 0, 0, f"{name} with return_k=False, {what}")
        assert_close(qkv, before, 0, 0, "q/k/v inputs after rotary.qk_store (they must not be modified)")


def check_silu_mul(fn, case: ParityCase, device, generator) -> None:
    for shape in ((5, 6 * case.head_dim), (2, 3, 2 * case.head_dim + 10)):
        x = torch.randn(shape, generator=generator).to(case.dtype).to(device)
        _close(fn(x), REFERENCE["act.silu_mul"](x), case.dtype, f"silu(gate) * up of shape {shape}")


def check_add_rms_norm(fn, case: ParityCase, device, generator) -> None:
    for shape in ((7, 8 * case.head_dim), (2, 3, 4 * case.head_dim + 24)):
        x, residual = (torch.randn(shape, generator=generator).to(case.dtype).to(device) for _ in range(2))
        weight = (1 + torch.randn(shape[-1], generator=generator) / 4).to(case.dtype).to(device)
        before = (x.clone(), residual.clone())
        out = fn(x, residual, weight, 1e-6)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise AssertionError(f"returned {type(out).__name__}, expected a pair (normed, sum)")
        want = REFERENCE["norm.add_rms"](x, residual, weight, 1e-6)
        assert_close(out[1], want[1], 0, 0, f"x + residual of shape {shape} (rounded once, as torch adds)")
        _close(out[0], want[0], case.dtype, f"rms_norm(x + residual) * weight of shape {shape}")
        assert_close(x, before[0], 0, 0, "x after norm.add_rms (inputs must not be modified)")
        assert_close(residual, before[1], 0, 0, "residual after norm.add_rms (inputs must not be modified)")


CHECKS = {
    "kv_cache.store": [("store", check_kv_store)],
    "attention.prefill": [("whole prompts", check_prefill_whole), ("chunks after a cached prefix", check_prefill_chunked)],
    "attention.decode": [("decode", check_decode)],
    "sampler": [("greedy and masked sampling", check_sampler)],
    "rotary.qk": [("q/k norm and rotary", check_rotary_qk)],
    "act.silu_mul": [("silu and mul", check_silu_mul)],
    "rotary.qk_store": [("q/k norm, rotary and KV store", check_rotary_qk_store)],
    "norm.add_rms": [("residual add and RMSNorm", check_add_rms_norm)],
}
