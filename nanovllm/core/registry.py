"""The kernel registry: op name -> implementations, resolved once per engine into a KernelPlan.

Resolution for a backend: the plugins.toml preference list first, then priority, skipping
implementations whose `check(query)` returns reasons. The reasons are kept so the choice can be
explained. An implementation the user named that cannot serve is an error, never a substitution.
"""
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from collections.abc import Mapping
from types import MappingProxyType
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
    # a graph-safe sampler is captured in decode graphs with params holding only temperatures and a seed
    "sampler": ("logits", "params"),
    # the elementwise work between a layer's matrix products (one kernel each where a backend fuses it)
    "rotary.qk": ("positions", "q", "k", "cos_sin_cache", "q_weight", "k_weight", "eps"),
    "act.silu_mul": ("x",),
    # the residual add and RMSNorm between sub-layers: returns (rms_norm(x + residual) * weight, x + residual)
    "norm.add_rms": ("x", "residual", "weight", "eps"),
    # rotary.qk then kv_cache.store in one kernel: returns (q, k) rotated, K and V stored through the slot
    # mapping; with return_k False the second may be None (decode reads K from the cache, not from k)
    "rotary.qk_store": ("positions", "q", "k", "v", "cos_sin_cache", "q_weight", "k_weight", "eps", "k_cache",
                        "v_cache", "slot_mapping", "return_k"),
}
# Fused ops: one kernel doing the work of other ops (its parts). They are resolved and checked like any op, but
# the model calls one only where a kernel other than the reference serves it: the reference is the parts'
# composition, so elsewhere (a backend without the fused kernel, kernels="reference", the user naming a part's
# kernel) the parts run, each with its own kernel, as before.
FUSED_OPS: dict[str, tuple[str, ...]] = {"rotary.qk_store": ("rotary.qk", "kv_cache.store")}
# ops that touch the KV cache: with an FP8 cache they are also passed (k_scale, v_scale) after the op's
# arguments, each a float32 [num_kv_heads] tensor (stored = value / scale); a kernel that cannot take them
# cannot serve an FP8 cache
KV_CACHE_OPS = ("kv_cache.store", "attention.prefill", "attention.decode", "rotary.qk_store")
KV_SCALE_ARGS = ("k_scale", "v_scale")


@dataclass(frozen=True)
class KernelQuery:
    """What a run needs of a kernel; hashable so resolution is done once."""
    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    kv_cache_dtype: torch.dtype | None = None  # None: the cache holds the model dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype

    @property
    def kv_is_fp8(self) -> bool:
        return self.kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def describe(self) -> str:
        kv = "" if self.kv_cache_dtype in (None, self.dtype) else f", KV cache {str(self.kv_cache_dtype)[6:]}"
        return (f"{str(self.dtype).removeprefix('torch.')}{kv}, head_dim {self.head_dim}, "
                f"{self.num_heads}/{self.num_kv_heads} heads, block size {self.block_size}")

    def head_reasons(self) -> list[str]:
        """Why the heads cannot be grouped (grouped-query attention needs num_heads a multiple of num_kv_heads)."""
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            return [f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"]
        return []


def takes_kv_scales(fn: Callable, op: str) -> bool:
    """Whether `fn` accepts (k_scale, v_scale) right after `op`'s own arguments."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    n = len(OPS[op])
    return tuple(names[n:n + len(KV_SCALE_ARGS)]) == KV_SCALE_ARGS


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
    plugin_version: str = ""  # the plugin package's version, where its distribution is known
    fallback: str = ""  # the kernel it hands some calls to, and when (e.g. "cpu_ref/torch for top-k ..."), if any

    @property
    def full_name(self) -> str:
        return f"{self.backend}/{self.name}"

    @property
    def is_reference(self) -> bool:
        """Registered by the cpu_ref plugin itself (or directly, plugin ""): one of the oracle's own kernels."""
        return self.backend == REFERENCE_BACKEND and self.plugin in ("", REFERENCE_BACKEND)

    @property
    def is_foreign_on_reference(self) -> bool:
        """Another plugin's kernel added to the cpu_ref backend: allowed, but never the reference."""
        return self.backend == REFERENCE_BACKEND and not self.is_reference

    def reasons(self, query: KernelQuery) -> list[str]:
        reasons = []
        if query.kv_is_fp8 and self.op in KV_CACHE_OPS and not takes_kv_scales(self.fn, self.op):
            reasons.append(f"KV cache {str(query.kv_dtype)[6:]} needs a kernel that takes "
                           f"({', '.join(KV_SCALE_ARGS)}); this one serves a model-dtype cache only")
        if self.check is None:
            return reasons
        try:
            return reasons + [r for r in self.check(query) if r not in reasons]
        except Exception as e:  # a broken check must not take the engine down
            return reasons + [f"its availability check raised {type(e).__name__}: {e}"]


@dataclass(frozen=True)
class OpChoice:
    op: str
    impl: KernelImpl
    why: str
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class KernelPlan:
    """One implementation per op for one engine, never changed once built (its mappings are read-only).

    `wrappers` (op -> callable) stand in for the chosen functions while shadow verification is on; the
    verifier keeps its demotions in its own state (`core/shadow.py`)."""
    backend: str
    choices: Mapping[str, OpChoice] = field(default_factory=dict)
    query: KernelQuery | None = None
    wrappers: Mapping[str, Callable] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "choices", MappingProxyType(dict(self.choices)))
        object.__setattr__(self, "wrappers", MappingProxyType(dict(self.wrappers)))

    def fn(self, op: str) -> Callable:
        return self.wrappers.get(op) or self.choices[op].impl.fn

    def calls(self, op: str) -> bool:
        """Whether the model calls `op`: every op in the plan, except a fused op served by the reference (then the
        model runs its parts, see FUSED_OPS)."""
        return op in self.choices and not (op in FUSED_OPS and self.choices[op].impl.is_reference)

    def model_kernels(self) -> dict[str, Callable]:
        """{op: function} for the ops the model calls (what a LayerContext carries)."""
        return {op: self.fn(op) for op in self.choices if self.calls(op)}

    def with_why(self, why: str) -> "KernelPlan":
        """The same kernels, each op's reason replaced by `why` (a replayed plan says it was pinned)."""
        return dataclasses.replace(self, choices={op: dataclasses.replace(c, why=why) for op, c in self.choices.items()})

    def table(self) -> str:
        """The plan as one aligned table: op, kernel, plugin and version, why; below each op the kernel it falls back
        to per call (if it does) and the kernels skipped, with their reasons."""
        rows = [("op", "kernel", "plugin", "why")]
        for op, c in self.choices.items():
            plugin = c.impl.plugin + (f" {c.impl.plugin_version}" if c.impl.plugin_version else "")
            why = c.why + (f" [FOREIGN: plugin {c.impl.plugin}'s kernel on the reference backend, not cpu_ref's own]"
                           if c.impl.is_foreign_on_reference else "")
            rows.append((op, c.impl.full_name, plugin or "-", why))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"  for {self.query.describe()}"] if self.query is not None else []
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
            choice = self.choices.get(row[0])
            if choice is None:
                continue
            if choice.impl.fallback:
                lines.append(f"  {'':<{widths[0]}}  falls back per call to {choice.impl.fallback}")
            if not self.calls(row[0]):
                lines.append(f"  {'':<{widths[0]}}  not called: the model runs {', then '.join(FUSED_OPS[row[0]])}")
            for name, reasons in choice.rejected:
                lines.append(f"  {'':<{widths[0]}}  skipped {name}: {'; '.join(reasons)}")
        return "\n".join(lines)


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def signature_problem(fn: Callable, op: str) -> str | None:
    """Why `fn` cannot be called as `op` passes its arguments, or None. Parameters may be renamed, but a name the
    op uses must sit at that name's position (a swapped k_cache/v_cache is an error, not a silent bug)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None  # builtins and C functions cannot be inspected
    expected = OPS[op]
    shown = f"takes ({', '.join(p.name for p in params)})"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) > len(expected):
        return f"{shown}: it requires {len(required)} arguments, the op passes {len(expected)}"
    if len(positional) < len(expected) and not any(p.kind == p.VAR_POSITIONAL for p in params):
        return f"{shown}: it accepts {len(positional)} arguments, the op passes {len(expected)}"
    keyword_only = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        return f"{shown}: it requires keyword-only {', '.join(keyword_only)}, which the op never passes"
    for i, p in enumerate(positional[:len(expected)]):
        if p.name != expected[i] and p.name in expected:
            return f"{shown}: parameter {i + 1} is named {p.name!r}, but the op passes {expected[i]!r} there"
    return None


class KernelRegistry:
    def __init__(self):
        self.impls: dict[str, list[KernelImpl]] = {op: [] for op in OPS}

    def register(self, op: str, backend: str, name: str, fn: Callable, priority: int = 0,
                 check: Callable[[KernelQuery], list[str]] | None = None, plugin: str = "",
                 graph_safe: bool = False, plugin_version: str = "", fallback: str = "") -> KernelImpl:
        """Add an implementation of `op` for `backend`. Raises ValueError for an unknown op or a bad signature.

        `fallback` names the kernel this one hands some calls to, and when; the plan shows it in the op's row."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}{suggest(op, OPS)}; known ops: {', '.join(OPS)}")
        if not callable(fn):
            raise ValueError(f"kernel {backend}/{name} for {op}: {fn!r} is not callable")
        problem = signature_problem(fn, op)
        if problem:
            raise ValueError(f"kernel {backend}/{name} for {op} {problem}; the op passes ({', '.join(OPS[op])}) "
                             f"positionally: fix the kernel's parameters")
        if any(i.backend == backend and i.name == name for i in self.impls[op]):
            raise ValueError(f"kernel {backend}/{name} is already registered for {op}")
        impl = KernelImpl(op, backend, name, fn, priority, check, plugin, graph_safe, plugin_version, fallback)
        self.impls[op].append(impl)
        return impl

    def candidates(self, op: str, backend: str) -> list[KernelImpl]:
        return [i for i in self.impls[op] if i.backend == backend]

    def reference(self, op: str) -> KernelImpl | None:
        """The oracle for `op`: the cpu_ref plugin's own kernel, whatever else is registered. Another plugin may add
        kernels under the cpu_ref backend, but they are candidates like any other, never the reference that
        kernels="reference", shadow verification and the parity kit check against."""
        own = [i for i in self.candidates(op, REFERENCE_BACKEND) if i.is_reference]
        return max(own, key=lambda i: i.priority) if own else None

    def resolve(self, backend: str, query: KernelQuery, preferences: dict[str, list[str]] | None = None,
                overrides: str | dict[str, str] | None = None, ops: list[str] | None = None,
                notes: dict[str, str] | None = None, exclude: frozenset[str] = frozenset()) -> KernelPlan:
        """Choose one implementation per op (all ops, or `ops`) for `backend`.

        `preferences` ({op: names}) are tried first; a name is a kernel of the backend or "backend/name" (the
        reference kernel, e.g. "cpu_ref/torch_loop", when tuning found it fastest). `notes` ({op: text}) says
        where an op's preference came from (e.g. "chosen by tune on ..."). `overrides` is "reference" (every
        op's reference kernel) or {op: kernel name}. `exclude` holds "backend/name" kernels never to choose.
        """
        preferences = preferences or {}
        if isinstance(overrides, dict):
            for op in overrides:
                if op not in OPS:
                    raise ValueError(f"kernels: unknown op {op!r}{suggest(op, OPS)}; known ops: {', '.join(OPS)}")
        elif overrides not in (None, "reference"):
            raise ValueError(f"kernels={overrides!r}: expected 'reference' or a dict {{op: kernel name}}")
        choices = {op: self._resolve_op(op, backend, query, preferences.get(op, []), overrides,
                                        (notes or {}).get(op), exclude) for op in (ops or OPS)}
        for op, parts in FUSED_OPS.items():
            if not isinstance(overrides, dict) or op not in choices or op in overrides:
                continue
            named = [p for p in parts if p in overrides]
            if named and self.reference(op) is not None:
                # a kernel the user named for a part must run: the fused kernel would bypass it
                choices[op] = OpChoice(op, self.reference(op), f"kernels= names {' and '.join(named)}: its parts run")
        for op, c in choices.items():
            if c.impl.is_foreign_on_reference:
                logger.warning("%s on the reference backend runs %s from plugin %r, not cpu_ref's own kernel "
                               "(the reference stays %s)", op, c.impl.full_name, c.impl.plugin,
                               getattr(self.reference(op), "full_name", "unregistered"))
        return KernelPlan(backend, choices, query)

    def _resolve_op(self, op, backend, query, preferred, overrides, note, exclude) -> OpChoice:
        reference = self.reference(op)
        if overrides == "reference":
            if reference is None:
                raise RuntimeError(f"no reference ({REFERENCE_BACKEND}) kernel is registered for {op}")
            return OpChoice(op, reference, "forced to the reference kernel")
        candidates = self.candidates(op, backend)
        pool = candidates + ([reference] if reference and reference not in candidates else [])
        if isinstance(overrides, dict) and op in overrides:
            return self._named(op, backend, query, overrides[op], pool)

        def rank(impl: KernelImpl) -> int | None:
            for i, entry in enumerate(preferred):
                if entry == impl.full_name or (entry == impl.name and impl.backend == backend):
                    return i
            return None
        # the reference joins the ranking only where a preference names it ("cpu_ref/torch_loop")
        ranked = [i for i in pool if i in candidates or rank(i) is not None]
        ranked.sort(key=lambda i: (rank(i) is None, rank(i) or 0, -i.priority))
        rejected = []
        for impl in ranked:
            reasons = ["demoted by shadow verification"] if impl.full_name in exclude else impl.reasons(query)
            if not reasons:
                if rank(impl) is not None:
                    why = note or "preferred by plugins.toml or the backend"
                else:
                    why = f"priority {impl.priority}"
                return OpChoice(op, impl, why, tuple(rejected))
            rejected.append((impl.name, tuple(reasons)))
        if reference is not None and reference not in ranked and not reference.reasons(query):
            why = ("no kernel registered for this backend" if not candidates else "no kernel of this backend can serve")
            if candidates and op not in FUSED_OPS:  # a fused op's parts run instead: nothing is slower
                logger.warning("%s: no %s kernel can serve this run (%s); using the reference kernel, which is slow",
                               op, backend, "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected))
            return OpChoice(op, reference, f"reference: {why}", tuple(rejected))
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected) or "none registered"
        raise RuntimeError(f"no kernel can serve {op} on backend {backend!r} ({detail})")

    @staticmethod
    def _named(op, backend, query, wanted, pool) -> OpChoice:
        """The kernel the user named for `op` (its name, or "backend/name"), or ValueError naming op and reasons."""
        named = [i for i in pool if i.name == wanted or i.full_name == wanted]
        if not named:
            known = [i.full_name if i.backend != backend else i.name for i in pool]
            raise ValueError(f"kernels[{op!r}]={wanted!r} is not a kernel of backend {backend!r}"
                             f"{suggest(wanted, known)}; known: {', '.join(known) or 'none'}")
        reasons = named[0].reasons(query)
        if reasons:
            raise ValueError(f"kernels[{op!r}]={wanted!r} cannot serve this run: {'; '.join(reasons)}")
        return OpChoice(op, named[0], "named by the user")
