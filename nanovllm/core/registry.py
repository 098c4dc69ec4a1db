"""The kernel registry: op name -> implementations, resolved once per engine into a KernelPlan.

Resolution for a backend: the plugins.toml preference list first, then priority, skipping
implementations whose `check(query)` returns reasons. The reasons are kept so the choice can be
explained. An implementation the user named that cannot serve is an error, never a substitution.
"""
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

REFERENCE_BACKEND = "cpu_ref"

# op name -> the parameters every implementation takes, in order
OPS: dict[str, tuple[str, ...]] = {
    "kv_cache.store": ("key", "value", "k_cache", "v_cache", "slot_mapping"),
    "attention.prefill": ("q", "k", "v", "k_cache", "v_cache", "meta", "scale"),
    "attention.decode": ("q", "k_cache", "v_cache", "meta", "scale"),
    "sampler": ("logits", "params"),
}


@dataclass(frozen=True)
class KernelQuery:
    """What a run needs of a kernel; hashable so resolution is done once."""
    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    block_size: int


@dataclass(frozen=True)
class KernelImpl:
    op: str
    backend: str
    name: str
    fn: Callable
    priority: int = 0
    check: Callable[[KernelQuery], list[str]] | None = None
    plugin: str = ""
    graph_safe: bool = False  # no host syncs or data-dependent launches: may be captured in a device graph

    def reasons(self, query: KernelQuery) -> list[str]:
        if self.check is None:
            return []
        try:
            return list(self.check(query))
        except Exception as e:  # a broken check must not take the engine down
            return [f"its availability check raised {type(e).__name__}: {e}"]


@dataclass(frozen=True)
class OpChoice:
    op: str
    impl: KernelImpl
    why: str
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class KernelPlan:
    backend: str
    choices: dict[str, OpChoice] = field(default_factory=dict)

    def fn(self, op: str) -> Callable:
        return self.choices[op].impl.fn

    def table(self) -> str:
        lines = []
        for op, c in self.choices.items():
            lines.append(f"  {op:<18} -> {c.impl.backend}/{c.impl.name}  ({c.why})")
            for name, reasons in c.rejected:
                lines.append(f"  {'':<18}    skipped {name}: {'; '.join(reasons)}")
        return "\n".join(lines)


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class KernelRegistry:
    def __init__(self):
        self.impls: dict[str, list[KernelImpl]] = {op: [] for op in OPS}

    def register(self, op: str, backend: str, name: str, fn: Callable, priority: int = 0,
                 check: Callable[[KernelQuery], list[str]] | None = None, plugin: str = "",
                 graph_safe: bool = False) -> KernelImpl:
        """Add an implementation of `op` for `backend`. Raises ValueError for an unknown op or a bad signature."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}{suggest(op, OPS)}; known ops: {', '.join(OPS)}")
        if not callable(fn):
            raise ValueError(f"kernel {backend}/{name} for {op}: {fn!r} is not callable")
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = None  # builtins and C functions cannot be inspected
        if params is not None and len(params) < len(OPS[op]) and not any(
                p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values()):
            raise ValueError(f"kernel {backend}/{name} for {op} takes ({', '.join(params)}); "
                             f"the op passes ({', '.join(OPS[op])})")
        if any(i.backend == backend and i.name == name for i in self.impls[op]):
            raise ValueError(f"kernel {backend}/{name} is already registered for {op}")
        impl = KernelImpl(op, backend, name, fn, priority, check, plugin, graph_safe)
        self.impls[op].append(impl)
        return impl

    def candidates(self, op: str, backend: str) -> list[KernelImpl]:
        return [i for i in self.impls[op] if i.backend == backend]

    def reference(self, op: str) -> KernelImpl | None:
        refs = self.candidates(op, REFERENCE_BACKEND)
        return max(refs, key=lambda i: i.priority) if refs else None

    def resolve(self, backend: str, query: KernelQuery, preferences: dict[str, list[str]] | None = None,
                overrides: str | dict[str, str] | None = None, ops: list[str] | None = None) -> KernelPlan:
        """Choose one implementation per op (all ops, or `ops`) for `backend`.

        `overrides` is "reference" (every op's reference kernel) or {op: kernel name}.
        """
        preferences = preferences or {}
        if isinstance(overrides, dict):
            for op in overrides:
                if op not in OPS:
                    raise ValueError(f"kernels: unknown op {op!r}{suggest(op, OPS)}; known ops: {', '.join(OPS)}")
        elif overrides not in (None, "reference"):
            raise ValueError(f"kernels={overrides!r}: expected 'reference' or a dict {{op: kernel name}}")
        choices = {op: self._resolve_op(op, backend, query, preferences.get(op, []), overrides) for op in (ops or OPS)}
        return KernelPlan(backend, choices)

    def _resolve_op(self, op, backend, query, preferred, overrides) -> OpChoice:
        reference = self.reference(op)
        if overrides == "reference":
            if reference is None:
                raise RuntimeError(f"no reference ({REFERENCE_BACKEND}) kernel is registered for {op}")
            return OpChoice(op, reference, "forced to the reference kernel")
        candidates = self.candidates(op, backend)
        if isinstance(overrides, dict) and op in overrides:
            wanted = overrides[op]
            pool = candidates + ([reference] if reference and reference not in candidates else [])
            named = [i for i in pool if i.name == wanted or f"{i.backend}/{i.name}" == wanted]
            if not named:
                raise ValueError(f"kernels[{op!r}]={wanted!r} is not a kernel of backend {backend!r}"
                                 f"{suggest(wanted, [i.name for i in pool])}; known: {', '.join(i.name for i in pool)}")
            reasons = named[0].reasons(query)
            if reasons:
                raise ValueError(f"kernels[{op!r}]={wanted!r} cannot serve this run: {'; '.join(reasons)}")
            return OpChoice(op, named[0], "named by the user")
        ranked = sorted(candidates, key=lambda i: (i.name not in preferred,
                                                   preferred.index(i.name) if i.name in preferred else 0, -i.priority))
        rejected = []
        for impl in ranked:
            reasons = impl.reasons(query)
            if not reasons:
                why = "preferred by plugins.toml or the backend" if impl.name in preferred else f"priority {impl.priority}"
                return OpChoice(op, impl, why, tuple(rejected))
            rejected.append((impl.name, tuple(reasons)))
        if reference is not None and not reference.reasons(query):
            why = ("no kernel registered for this backend" if not candidates else "no kernel of this backend can serve")
            if candidates:
                logger.warning("%s: no %s kernel can serve this run (%s); using the reference kernel, which is slow",
                               op, backend, "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected))
            return OpChoice(op, reference, f"reference: {why}", tuple(rejected))
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected) or "none registered"
        raise RuntimeError(f"no kernel can serve {op} on backend {backend!r} ({detail})")
