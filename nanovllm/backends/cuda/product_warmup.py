"""Run a decoder layer's products at the row counts a step can have, at start-up, so no step pays cuBLAS's
first call of a kernel.

cuBLAS picks its kernel by the product's shape, and the first call of a kernel a process has not run before costs
2.2-4.7 ms of host time (on an H200, with every CUDA module loaded eagerly too: its own set-up, not the driver's
lazy loading; benchmarks/RESULTS.md, round twenty-eight). Rows are what varies: a prefill step has as many as its
tokens, 1 to max_num_batched_tokens. The seed benchmark's last prefill step (11,755 tokens) met three such
kernels, its launch 16-24 ms slower than the same step's in a second run and ~2-3 ms of it idling the GPU; a
server meets them at every new size range, one first call each, in some user's request. The decode graphs ran
their batch sizes at capture, and the LM head pads its rows to those sizes (model_runner.padded_rows).

So here each distinct product of the first decoder layer (the others have the same shapes: same kernels) runs once
at every row count of `warm_up_rows`. Which counts: `benchmarks/gemm_first_call.py --scan 16384` called a
Qwen3-0.6B layer's products at every row count from 1 to 16,384 in turn on an H200 and found 380 first calls of a
kernel (68 for q/k/v, 119 for o added into the residual, ...), all but one (1.05 ms, at 10,491) at a count of 8k or
8k + 1: cuBLAS's choice changes where the count crosses a multiple of 8, either way; past 8,192 rows there were
three (10,624 and 11,584, multiples of 64, and that one). So every 8k and 8k + 1 runs up to EXHAUSTIVE_ROWS, every
64k and 64k + 1 beyond (a product's time grows with its rows: on an H200 every 8k and 8k + 1 up to 16,384 took
3.3-5.0 s of start-up, with no first call left at 400 random counts after it; stopping at 8,192 runs 2,316
row counts, not 4,108, a third of the products' work, and left none either: see RESULTS.md, round twenty-nine).
The products are called as the layer's forward calls them (its `product`, or the folded layer's `add_product`
with the residual), on inputs of zeros, under tensor parallelism on this rank's shard (no collective).
"""
from __future__ import annotations

from typing import Callable

import torch

from nanovllm.models.layers.linear import LinearBase

ALIGN = 8  # cuBLAS's kernel choice changes at row counts of 8k or 8k + 1 (see above)
EXHAUSTIVE_ROWS = 8192  # every 8k and 8k + 1 up to here
COARSE_STEP = 64  # beyond it, every 64k and 64k + 1


def warm_up_rows(max_rows: int, align: int = ALIGN, exhaustive_rows: int = EXHAUSTIVE_ROWS,
                 coarse_step: int = COARSE_STEP) -> list[int]:
    """Row counts to warm, up to `max_rows`: 1 to 16 each, every multiple m of `align` and m + 1 up to
    `exhaustive_rows`, every multiple m of `coarse_step` and m + 1 beyond, and `max_rows` itself."""
    rows = set(range(1, min(16, max_rows) + 1)) | {max_rows}
    m = align
    while m <= max_rows:
        rows |= {m, m + 1}
        m += align if m < exhaustive_rows else coarse_step
    return sorted(r for r in rows if r <= max_rows)


def layer_products(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, linear module, added into the residual) for each product of the model's first decoder layer; []
    when the model has no `model.layers` of such modules. Added: the folded layer (norm_folding) runs the o and
    down products as cuBLAS's C += A B on the residual, which may pick other kernels than F.linear."""
    from nanovllm.backends.cuda.norm_folding import is_folded
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return []
    layer = layers[0]
    folded = is_folded(model)
    added = {id(getattr(getattr(layer, "self_attn", None), "o_proj", None)),
             id(getattr(getattr(layer, "mlp", None), "down_proj", None))} if folded else set()
    return [(name, module, id(module) in added) for name, module in layer.named_modules()
            if isinstance(module, LinearBase)]


def product_calls(products: list[tuple[str, torch.nn.Module, bool]], max_rows: int
                  ) -> list[tuple[str, Callable[[int], None]]]:
    """One `call(rows)` per product, on slices of zero inputs of max_rows rows (one per role, width and dtype)."""
    from nanovllm.backends.cuda.norm_folding import add_product
    zeros: dict[tuple, torch.Tensor] = {}

    def input_of(width: int, like: torch.Tensor, role: str = "x") -> torch.Tensor:
        key = (role, width, like.dtype, like.device)
        if key not in zeros:
            zeros[key] = torch.zeros(max_rows, width, dtype=like.dtype, device=like.device)
        return zeros[key]
    calls = []
    for name, module, added in products:
        weight = module.weight
        n, k = weight.shape
        x = input_of(k, weight)
        if added:
            residual = input_of(n, weight, "residual")  # never an input too (addmm_ must not alias its output)
            calls.append((name, lambda m, module=module, x=x, r=residual: add_product(module, x[:m], r[:m])))
        else:
            calls.append((name, lambda m, module=module, x=x: module.product(x[:m])))
    return calls


@torch.inference_mode()
def warm_up_products(model: torch.nn.Module, max_rows: int, **rows_options) -> int:
    """Run each product of the first decoder layer at every row count of `warm_up_rows(max_rows, **rows_options)`;
    returns the calls made."""
    calls = product_calls(layer_products(model), max_rows)
    rows = warm_up_rows(max_rows, **rows_options)
    for m in rows:
        for _, call in calls:
            call(m)
    return len(rows) * len(calls)
