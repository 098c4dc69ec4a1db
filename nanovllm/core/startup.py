"""Start-up in one place: which backend, dtype, KV block size and kernels one engine runs, and why.

`resolve(config, plugins)` is the only function that decides them; its result is one frozen `Resolved`.
It reads the config and never writes into it. The engine calls it on rank 0, and so do `nanovllm backends
--plan --model` and `nanovllm tune`. Tensor-parallel workers never resolve: rank 0 sends them
`pinned(resolved)` and each rebuilds the same plan with `from_pinned` (same kernels, found by name).

Which kernel runs for decode (or any op), and why:
1. The backend: `backend=` / `--backend`, the backend a replayed `kernel_plan=` was saved for, else the first
   available in plugins.toml's `[backends] order` (`Plugins.select`).
2. The query: `kernel_query` below: device type, dtype, head_dim and this rank's heads and KV heads, and the
   KV block size (`config.kvcache_block_size` or the backend's `default_block_size`), both checked against
   the backend once (`backend_reasons`).
3. The kernel, per op (`KernelRegistry.resolve` in `core/registry.py`): a kernel named by `kernels=` or the
   replayed plan, if its check accepts the query (else an error, never a substitute); otherwise the first
   kernel of the backend's preference list (`Backend.kernel_preferences`, replaced per op by plugins.toml's
   `[kernels.<backend>]`, which `nanovllm tune` writes) whose check accepts the query, then the others by
   priority; the cpu_ref reference kernel when none can serve. `kernels="reference"` forces the reference.
4. Per call: a kernel registered with a `fallback` hands some calls to another kernel (the plan row says
   "falls back per call to ..."); with `verify_kernels=N`, shadow verification may demote a kernel that
   differs from its reference (`core/shadow.py`; `LLM.kernel_plan()` shows the demotion).

The answer for a run is `resolved.plan.table()`: logged at start, `LLM.kernel_plan().table()`, and
`nanovllm backends --plan [--model PATH]`, each op with its kernel, plugin, reason and skipped candidates.
"""
import dataclasses
from dataclasses import dataclass

import torch

from nanovllm.core.backend import Backend
from nanovllm.core.config import EngineConfig
from nanovllm.core.kernel_plan_io import load_plan
from nanovllm.core.kv_quant import KV_CACHE_DTYPES
from nanovllm.core.logging import get_logger
from nanovllm.core.plugins import Plugins
from nanovllm.core.registry import KernelPlan, KernelQuery, OpChoice
from nanovllm.models.decoder import head_dim_of

logger = get_logger(__name__)


@dataclass(frozen=True)
class Resolved:
    """What one engine runs with, decided once at start-up."""
    backend: Backend
    dtype: torch.dtype
    block_size: int  # tokens per KV-cache block
    max_model_len: int  # the config's, capped at the model's max_position_embeddings
    plan: KernelPlan


@dataclass(frozen=True)
class PinnedPlan:
    """Rank 0's `Resolved` as plain data for a tensor-parallel worker process (kernels by name)."""
    backend: str
    dtype: torch.dtype
    block_size: int
    max_model_len: int
    query: KernelQuery
    kernels: tuple[tuple[str, str, str], ...]  # (op, "backend/name", why)


def kernel_query(hf_config, device_type: str, dtype: torch.dtype, block_size: int, tp_size: int = 1,
                 kv_cache_dtype: torch.dtype | None = None) -> KernelQuery:
    """What one rank asks of its kernels: its share of the heads under tensor parallelism, and what the KV
    cache stores (None: the model dtype)."""
    return KernelQuery(device_type, dtype, head_dim_of(hf_config), max(1, hf_config.num_attention_heads // tp_size),
                       max(1, hf_config.num_key_value_heads // tp_size), block_size, kv_cache_dtype)


def backend_reasons(backend: Backend, dtype: torch.dtype, block_size: int) -> list[str]:
    """Why `backend` cannot run with this dtype and KV block size (empty: it can). The one place both are checked
    against the backend; the config checks only that the block size is a positive power of two."""
    reasons = []
    if dtype not in backend.supported_dtypes:
        reasons.append(f"dtype={dtype} is not supported by backend {backend.name!r}; "
                       f"supported: {', '.join(str(d) for d in backend.supported_dtypes)}")
    block_reasons = backend.check_block_size(block_size)
    if block_reasons:
        reasons.append(f"kvcache_block_size={block_size} cannot be used by backend {backend.name!r}: "
                       + "; ".join(block_reasons))
    return reasons


def check_kv_cache_dtype(config: EngineConfig, backend: Backend, plugins: Plugins) -> torch.dtype | None:
    """The KV cache's storage dtype (None: the model dtype); ValueError if the backend cannot hold it."""
    if config.kv_cache_dtype not in backend.kv_cache_dtypes:
        able = [name for name, b in plugins.backends.items() if config.kv_cache_dtype in b.kv_cache_dtypes]
        raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} is not supported by backend {backend.name!r}, "
                         f"which supports {', '.join(map(repr, backend.kv_cache_dtypes))}: use one of those"
                         + (f", or a backend that has it ({', '.join(able)})" if able else ""))
    return KV_CACHE_DTYPES[config.kv_cache_dtype]


def resolve_kernels(plugins: Plugins, backend: str, query: KernelQuery, kernels: str | dict | None = None,
                    **options) -> KernelPlan:
    """The registry's plan for `backend` at `query`, with plugins.toml's preferences and tune's notes applied."""
    return plugins.registry.resolve(backend, query, plugins.kernel_preferences(backend), kernels,
                                    notes=plugins.preference_notes(backend), **options)


def resolve(config: EngineConfig, plugins: Plugins) -> Resolved:
    """Backend, dtype, KV block size, max_model_len and kernel plan for `config`; raises naming any value that
    cannot serve. With `config.kernel_plan` every op is pinned to the saved plan's kernel."""
    replay = None
    backend_name = config.backend
    if config.kernel_plan is not None:
        replay = load_plan(config.kernel_plan)
        if backend_name not in (None, replay[0]):
            raise ValueError(f"kernel plan {config.kernel_plan!r} was saved for backend {replay[0]!r}, but backend="
                             f"{backend_name!r} was asked for: drop one, or save a plan for {backend_name!r}")
        backend_name = replay[0]
    check_backend_options(config, plugins)
    backend = plugins.select(backend_name, config.device)
    device_type = torch.device(config.device).type if config.device else backend.device_type
    dtype = config.dtype or backend.default_dtype_for(torch.device(device_type))
    block_size = config.kvcache_block_size or backend.default_block_size
    reasons = backend_reasons(backend, dtype, block_size)
    if reasons:
        raise ValueError("; ".join(reasons))
    kv_cache_dtype = check_kv_cache_dtype(config, backend, plugins)
    query = kernel_query(config.hf_config, device_type, dtype, block_size, config.tensor_parallel_size,
                         kv_cache_dtype)
    try:
        plan = resolve_kernels(plugins, backend.name, query, replay[1] if replay else config.kernels)
    except (ValueError, RuntimeError) as e:
        if replay is None:
            raise
        raise ValueError(f"kernel plan {config.kernel_plan!r} cannot be honoured: {e}") from None
    if replay is not None:
        plan = plan.with_why(f"pinned by kernel plan {config.kernel_plan}")
    logger.info("backend %s, %s, kernels:\n%s", backend.name, dtype, plan.table())
    return Resolved(backend, dtype, block_size, capped_max_model_len(config), plan)


def with_verification(resolved: Resolved, plugins: Plugins, every: int | None) -> Resolved:
    """`resolved` whose plan shadow-verifies one call in `every` per op and shape (`core/shadow.py`); unchanged
    when `every` is None."""
    if not every:
        return resolved
    from nanovllm.core.shadow import install_shadow_verification
    return dataclasses.replace(resolved, plan=install_shadow_verification(resolved.plan, plugins, every))


# vLLM engine options a script may carry over, and what to do instead (an unknown option is never ignored)
VLLM_OPTION_HINTS = {
    "block_size": "nanovllm calls it kvcache_block_size",
    "enable_chunked_prefill": "long prompts are always prefilled in chunks of max_num_batched_tokens; drop it",
    "trust_remote_code": "nanovllm runs no model code from the hub (its architectures are built in); drop it",
    "swap_space": "preempted requests are recomputed, not swapped to the CPU; drop it",
    "disable_log_stats": "nanovllm logs no periodic stats (its log level: NANOVLLM_LOG_LEVEL); drop it",
    "quantization": "quantised checkpoints are not supported (an FP8 KV cache is: kv_cache_dtype='fp8')",
    "revision": "models are local folders, nothing is downloaded: pass the folder",
    "download_dir": "models are local folders, nothing is downloaded: pass the folder",
    "pipeline_parallel_size": "only tensor parallelism is supported (tensor_parallel_size)",
}


def check_backend_options(config: EngineConfig, plugins: Plugins) -> None:
    """ValueError for an option no engine field and no backend declares, or a value its backend refuses. A
    backend's option passed while another backend runs is checked and then unused (scripts stay portable)."""
    declared = {name: option for b in plugins.backends.values() for name, option in b.options.items()}
    unknown = sorted(set(config.backend_options) - set(declared))
    if unknown:
        known = EngineConfig.option_names() + sorted(declared)
        hints = "".join(f"; {name}: {VLLM_OPTION_HINTS[name]}" for name in unknown if name in VLLM_OPTION_HINTS)
        raise ValueError(f"unknown engine option(s) {', '.join(unknown)}{hints}; known: {', '.join(known)}")
    for name, value in config.backend_options.items():
        declared[name].check(name, value)


def capped_max_model_len(config: EngineConfig) -> int:
    max_pos = getattr(config.hf_config, "max_position_embeddings", config.max_model_len)
    if config.max_model_len > max_pos:
        logger.info("max_model_len=%d exceeds the model's max_position_embeddings=%d; using %d",
                    config.max_model_len, max_pos, max_pos)
        return max_pos
    return config.max_model_len


def pinned(resolved: Resolved) -> PinnedPlan:
    plan = resolved.plan
    return PinnedPlan(resolved.backend.name, resolved.dtype, resolved.block_size, resolved.max_model_len, plan.query,
                      tuple((op, c.impl.full_name, c.why) for op, c in plan.choices.items()))


def from_pinned(spec: PinnedPlan, plugins: Plugins) -> Resolved:
    """Rank 0's choices in this process: the same backend and kernels, found by name, nothing re-resolved."""
    backend = plugins.backends.get(spec.backend)
    if backend is None:
        raise RuntimeError(f"this worker process has no backend {spec.backend!r} (rank 0 has): its plugin failed "
                           f"to load here: {plugins.failures or 'not installed'}")
    choices = {}
    for op, full_name, why in spec.kernels:
        found = [i for i in plugins.registry.impls[op] if i.full_name == full_name]
        if not found:
            raise RuntimeError(f"this worker process has no kernel {full_name} for {op} (rank 0 chose it): its "
                               f"plugin failed to load here: {plugins.failures or 'not installed'}")
        choices[op] = OpChoice(op, found[0], why)
    plan = KernelPlan(spec.backend, choices, spec.query)
    return Resolved(backend, spec.dtype, spec.block_size, spec.max_model_len, plan)

