"""Per-kernel benchmarks: every available backend x registered kernel, at a few realistic shapes.

    python -m pytest benchmarks/test_kernels.py --benchmark-json=kernels.json          # quick on CPU
    NANOVLLM_BENCH=full python -m pytest benchmarks/test_kernels.py --benchmark-json=kernels.json

NANOVLLM_BENCH=quick (the default when no available backend runs on anything but the CPU) uses tiny
shapes and few rounds, so CI can run it; `full` uses serving-sized shapes for a device. Not collected
by a plain `python -m pytest` (pyproject's testpaths is tests/). Numbers are never asserted on.
"""
import os
import platform

import pytest
import torch

from nanovllm.core.plugins import backend_availability, load_plugins
from nanovllm.core.sampler import SamplingTensors
from nanovllm.testing.layouts import ParityCase, random_layout
from nanovllm.testing.parity import prefill_inputs, backend_device, case_reasons, parity_cases

PLUGINS = load_plugins()
ON_DEVICE = any(b.device_type != "cpu" and backend_availability(b)[0] for b in PLUGINS.backends.values())
MODE = os.environ.get("NANOVLLM_BENCH", "full" if ON_DEVICE else "quick")
if MODE not in ("quick", "full"):
    raise ValueError(f"NANOVLLM_BENCH={MODE!r}: expected 'quick' (tiny shapes, CPU CI) or 'full' (device)")

# name -> (num_seqs, max_context_len, num_heads, num_kv_heads, head_dim); vocab for the sampler
SHAPES = {
    "quick": {"small": (4, 64, 4, 2, 64), "gqa": (8, 128, 8, 2, 128)},
    "full": {"qwen3-0.6b": (64, 1024, 16, 8, 128), "llama-8b": (128, 2048, 32, 8, 128),
             "long-ctx": (8, 8192, 16, 8, 128)},
}[MODE]
VOCAB = {"quick": 2048, "full": 151936}[MODE]
ROUNDS = {"quick": dict(rounds=3, iterations=1, warmup_rounds=1), "full": dict(rounds=30, iterations=1, warmup_rounds=5)}[MODE]
OPS = ("attention.decode", "attention.prefill", "kv_cache.store", "sampler")
CELLS = [c for c in parity_cases(PLUGINS) if c.op in OPS]


def make_call(op, fn, case: ParityCase, device):
    """A no-argument closure running `fn` once on inputs built up front, on `device`."""
    g = torch.Generator().manual_seed(0)
    scale = case.head_dim ** -0.5
    if op == "sampler":
        logits = torch.randn(case.num_seqs, VOCAB, generator=g).to(device)
        params = SamplingTensors(torch.full((case.num_seqs,), 0.8, device=device),
                                 top_p=torch.full((case.num_seqs,), 0.9, device=device))
        return lambda: fn(logits, params)
    if op == "attention.decode":
        from nanovllm.core.step_metadata import DecodeMetadata
        layout = random_layout(case, device, "decode", g)
        q = torch.randn(case.num_seqs, case.num_heads, case.head_dim, generator=g).to(case.dtype).to(device)
        meta = DecodeMetadata(torch.tensor(layout.context_lens, dtype=torch.int32, device=device),
                              layout.block_tables, max(layout.context_lens))
        return lambda: fn(q, layout.k_cache, layout.v_cache, meta, scale)
    kind = "chunked" if op == "attention.prefill" else "prefill"
    layout = random_layout(case, device, kind, g)
    q, k, v, meta = prefill_inputs(layout, case, device, g, with_tables=True)
    if op == "attention.prefill":
        return lambda: fn(q, k, v, layout.k_cache, layout.v_cache, meta, scale)
    return lambda: fn(k, v, layout.k_cache, layout.v_cache, layout.slot_mapping)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_kernel(benchmark, cell, shape):
    if cell.skip_reason:
        pytest.skip(cell.skip_reason)
    backend = cell.backend
    num_seqs, max_context_len, num_heads, num_kv_heads, head_dim = SHAPES[shape]
    dtype = backend.default_dtype
    case = ParityCase(dtype, head_dim, num_heads, num_kv_heads, backend.default_block_size, num_seqs, max_context_len)
    reasons = case_reasons(backend, cell.impl, case)
    if reasons:
        pytest.skip(f"{cell}: {'; '.join(reasons)}")
    device = backend_device(backend)
    call = make_call(cell.op, cell.impl.fn, case, device)

    def run():
        out = call()
        backend.synchronize(device)
        return out
    benchmark.group = f"{cell.op} {shape}"
    benchmark.extra_info.update(backend=cell.backend_name, kernel=cell.impl.name, op=cell.op, shape=shape,
                                case=str(case), device=str(device), mode=MODE, torch=torch.__version__,
                                machine=platform.machine())
    benchmark.pedantic(run, **ROUNDS)
