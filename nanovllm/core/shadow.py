"""Shadow verification: recompute one call in N of each op (per shape bucket) with its reference twin.

Installed only when `verify_kernels=N` is set: the engine runs a copy of its KernelPlan whose `wrappers` put
a `VerifiedKernel` in front of each op's function; the model binds it once. It holds its current target, so
demoting a kernel takes effect in every layer at once. On a mismatch beyond the per-dtype tolerance it logs
an error naming the op, the kernel, the shapes and the error, returns the reference's result for that call,
and switches to the next usable kernel for the rest of the run. The demotion lives here, in the
VerifiedKernel; the plan never changes, and `current_plan(plan)` shows the plan with the demotions applied.
"""
import dataclasses
from collections import defaultdict
from typing import Callable

import torch

from nanovllm.core.kv_store import store_kvcache
from nanovllm.core.logging import get_logger
from nanovllm.core.registry import KernelImpl, KernelPlan, OpChoice
from nanovllm.core.tolerances import TOLERANCES, max_violation

logger = get_logger(__name__)


def shape_bucket(args) -> tuple:
    """The tensor arguments' shapes, the leading (token or sequence) dim rounded up to a power of two."""
    shapes = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim():
            shapes.append((1 << max(0, a.shape[0] - 1).bit_length(), *a.shape[1:]))
    return tuple(shapes)


def shapes_of(args) -> str:
    return ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))


class VerifiedKernel:
    """Callable standing in for one op's kernel; `resolve_again(excluded)` gives the next usable choice."""

    def __init__(self, op: str, choice: OpChoice, reference: KernelImpl, every: int,
                 resolve_again: Callable[[frozenset[str]], OpChoice]):
        self.op, self.reference, self.every = op, reference, every
        self.resolve_again = resolve_again
        self.choice = choice  # what runs now, with the reason: the resolved choice until a demotion
        self.target: KernelImpl = choice.impl
        self.excluded: frozenset[str] = frozenset()
        self.calls: dict[tuple, int] = defaultdict(int)

    def __call__(self, *args):
        target = self.target
        if target is self.reference or not self._due(args):
            return target.fn(*args)
        if self.op == "kv_cache.store":
            return self._verify_store(target, *args)
        if self.op == "rotary.qk_store":
            return self._verify_qk_store(target, *args)
        if self.op == "sampler":
            return self._verify_sampler(target, *args)
        return self._verify_output(target, args)

    def _due(self, args) -> bool:
        if self.op == "sampler" and not args[1].all_greedy:
            return False  # random sampling differs between correct samplers: only greedy steps are comparable
        key = shape_bucket(args)
        count = self.calls[key]
        self.calls[key] = count + 1
        return count % self.every == 0

    def _verify_output(self, target: KernelImpl, args):
        expected = self.reference.fn(*args)  # the reference reads its inputs and writes nothing
        out = target.fn(*args)
        error = self._error(_flat(out), _flat(expected))
        if error is not None:
            self._demote(target, args, error)
            return expected
        return out

    def _verify_store(self, target: KernelImpl, key, value, k_cache, v_cache, slot_mapping, *kv_scales):
        # The reference writes copies of only the rows this call touches, so the check costs O(tokens), not O(cache).
        valid = slot_mapping >= 0
        slots = slot_mapping[valid]
        rows = (slots.numel(), 1, *k_cache.shape[2:])
        ref_k, ref_v = k_cache.new_empty(rows), v_cache.new_empty(rows)
        dense = torch.arange(slots.numel(), device=slot_mapping.device, dtype=slot_mapping.dtype)
        self.reference.fn(key[valid], value[valid], ref_k, ref_v, dense, *kv_scales)
        target.fn(key, value, k_cache, v_cache, slot_mapping, *kv_scales)
        got_k, got_v = k_cache.view(-1, *k_cache.shape[2:])[slots], v_cache.view(-1, *v_cache.shape[2:])[slots]
        error = self._error(torch.cat([got_k, got_v]), torch.cat([ref_k.flatten(0, 1), ref_v.flatten(0, 1)]), exact=True)
        if error is not None:
            k_cache.view(-1, *k_cache.shape[2:])[slots] = ref_k.flatten(0, 1)
            v_cache.view(-1, *v_cache.shape[2:])[slots] = ref_v.flatten(0, 1)
            self._demote(target, (key, value, k_cache, v_cache, slot_mapping), error)

    def _verify_qk_store(self, target: KernelImpl, *args):
        # (positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping, return_k,
        # *kv_scales): the rotated q and k against the reference's (which stores nothing: every slot -1), and the
        # cache rows exactly as kv_cache.store's reference writes the kernel's own rotated K and the V
        k_cache, v_cache, slot_mapping, return_k, kv_scales = args[8], args[9], args[10], args[11], args[12:]
        expected = self.reference.fn(*args[:10], torch.full_like(slot_mapping, -1), True, *kv_scales)
        out = target.fn(*args[:11], True, *kv_scales)
        error = self._error(_flat(out), _flat(expected))
        valid = slot_mapping >= 0
        slots = slot_mapping[valid]
        rows = (slots.numel(), 1, *k_cache.shape[2:])
        ref_k, ref_v = k_cache.new_empty(rows), v_cache.new_empty(rows)
        dense = torch.arange(slots.numel(), device=slot_mapping.device, dtype=slot_mapping.dtype)
        source = out[1] if error is None else expected[1]
        store_kvcache(source[valid], args[3][valid], ref_k, ref_v, dense, *kv_scales)
        got_k, got_v = k_cache.view(-1, *k_cache.shape[2:])[slots], v_cache.view(-1, *v_cache.shape[2:])[slots]
        if error is None:
            error = self._error(torch.cat([got_k, got_v]), torch.cat([ref_k.flatten(0, 1), ref_v.flatten(0, 1)]),
                                exact=True)
        if error is None:
            return out[0], out[1] if return_k else None
        k_cache.view(-1, *k_cache.shape[2:])[slots] = ref_k.flatten(0, 1)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = ref_v.flatten(0, 1)
        self._demote(target, args[1:4], error)
        return expected[0], expected[1] if return_k else None

    def _verify_sampler(self, target: KernelImpl, logits, params):
        expected = self.reference.fn(logits, params)
        out = target.fn(logits, params)
        if out.shape != expected.shape or not torch.equal(out, expected):
            mismatched = (out != expected).sum().item() if out.shape == expected.shape else out.numel()
            self._demote(target, (logits,), f"{mismatched} of {expected.numel()} greedy tokens differ")
            return expected
        return out

    def _error(self, out, expected: torch.Tensor, exact: bool = False) -> str | None:
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"returned {got}, expected shape {tuple(expected.shape)}"
        atol, rtol = (0.0, 0.0) if exact else TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
        error = max_violation(out, expected, atol, rtol)
        return None if error is None else f"max abs error {error:.3g} (atol {atol:g}, rtol {rtol:g}, {expected.dtype})"

    def _demote(self, target: KernelImpl, args, error: str) -> None:
        self.excluded |= {target.full_name}
        replacement = self.resolve_again(self.excluded)
        reason = f"shadow verification: {error} at shapes {shapes_of(args)}"
        logger.error("kernel %s for %s differs from its reference %s at shapes %s: %s; demoted to %s for the rest "
                     "of the run", target.full_name, self.op, self.reference.full_name, shapes_of(args), error,
                     replacement.impl.full_name)
        self.choice = OpChoice(self.op, replacement.impl, f"demoted {target.full_name} (see skipped)",
                               ((target.name, (reason,)), *replacement.rejected))
        self.target = replacement.impl


def _flat(out):
    """One tensor for comparison: ops that return several tensors (rotary.qk's q and k) are flattened and joined."""
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return torch.cat([t.flatten() for t in out])
    return out


def install_shadow_verification(plan: KernelPlan, plugins, every: int) -> KernelPlan:
    """`plan` with a VerifiedKernel in front of every op whose reference twin is registered; a demoted op is
    re-resolved without the kernels that failed."""
    from nanovllm.core.startup import resolve_kernels

    def resolve_again(op: str, excluded: frozenset[str]) -> OpChoice:
        return resolve_kernels(plugins, plan.backend, plan.query, ops=[op], exclude=excluded).choices[op]

    wrappers = {}
    for op, choice in plan.choices.items():
        reference = plugins.registry.reference(op)
        if reference is not None:
            wrappers[op] = VerifiedKernel(op, choice, reference, every,
                                          lambda excluded, op=op: resolve_again(op, excluded))
    logger.info("shadow verification is on: one call in %d of each op and shape is recomputed with its reference "
                "kernel", every)
    return dataclasses.replace(plan, wrappers=wrappers)


def current_plan(plan: KernelPlan) -> KernelPlan:
    """`plan` as it runs now: each op shadow verification demoted shows its replacement and why."""
    demoted = {op: w.choice for op, w in plan.wrappers.items()
               if isinstance(w, VerifiedKernel) and w.choice is not plan.choices[op]}
    return dataclasses.replace(plan, choices={**plan.choices, **demoted}) if demoted else plan
