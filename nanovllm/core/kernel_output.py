"""Checks at the boundary where a kernel's output enters the engine: a wrong shape, dtype or value is an error
naming the kernel and its plugin, not a confusing failure further on (a matmul shape error, a token id the
detokenizer cannot decode). Each check is a few comparisons on the host: no device sync."""
from collections.abc import Callable

import torch

from nanovllm.core.registry import KernelPlan
from nanovllm.core.shadow import current_plan

Label = Callable[[str], str]  # op name -> words naming the kernel that runs it (see kernel_label)


def kernel_label(plan: KernelPlan, op: str) -> str:
    """"kernel cuda/triton_paged (plugin cuda 0.1.0) for attention.decode": the kernel running `op` now (after
    any shadow-verification demotion)."""
    impl = current_plan(plan).choices[op].impl
    plugin = (impl.plugin or "?") + (f" {impl.plugin_version}" if impl.plugin_version else "")
    return f"kernel {impl.full_name} (plugin {plugin}) for {op}"


def bad_output(label: Label, op: str, problem: str) -> RuntimeError:
    return RuntimeError(f"{label(op)} returned {problem}: the kernel is broken; pin another with "
                        f"kernels={{{op!r}: <name>}} (or kernels='reference') and report it to the plugin's authors")


def check_like(label: Label, op: str, out, expected: torch.Tensor) -> torch.Tensor:
    """`out` must be a tensor of `expected`'s shape and dtype (an attention kernel's output is like its query)."""
    return check_shape(label, op, out, expected.shape, expected.dtype)


def check_shape(label: Label, op: str, out, shape, dtype: torch.dtype) -> torch.Tensor:
    """`out` must be a tensor of this shape and dtype."""
    if not isinstance(out, torch.Tensor):
        raise bad_output(label, op, f"a {type(out).__name__}, not a tensor")
    if out.shape != shape or out.dtype != dtype:
        raise bad_output(label, op, f"shape {tuple(out.shape)} {out.dtype}; expected {tuple(shape)} {dtype}")
    return out


def check_pair_like(label: Label, op: str, out, first: torch.Tensor, second: torch.Tensor, names: str = "(q, k)"):
    """`out` must be a pair of tensors like (`first`, `second`) (rotary.qk returns the new q and k, norm.add_rms the
    normed sum and the sum); `names` says what the pair holds."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise bad_output(label, op, f"a {type(out).__name__}, not a pair of tensors {names}")
    return check_like(label, op, out[0], first), check_like(label, op, out[1], second)


def check_token_ids(label: Label, tokens, num_rows: int) -> torch.Tensor:
    """The sampler's output: an integer tensor of one token id per sampled row."""
    if not isinstance(tokens, torch.Tensor):
        raise bad_output(label, "sampler", f"a {type(tokens).__name__}, not a tensor of token ids")
    if tokens.dtype not in (torch.int64, torch.int32) or tokens.shape != (num_rows,):
        raise bad_output(label, "sampler", f"shape {tuple(tokens.shape)} {tokens.dtype}; expected ({num_rows},) "
                                          f"int64 token ids")
    return tokens


def check_token_range(label: Label, token_ids: list[int], vocab_size: int) -> list[int]:
    """Every sampled id inside the vocabulary (checked on the host copy, once the step is done)."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise bad_output(label, "sampler", f"token id {bad}, outside the vocabulary [0, {vocab_size})")
    return token_ids
