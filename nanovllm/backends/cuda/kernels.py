"""The cuda backend's kernels and the checks that say when each can serve a run.

Importing this module loads neither triton nor flash_attn: each kernel module is imported on the first
call, so the plugin loads on machines without them (where the checks explain why they are skipped), and
tests can enable Triton's interpreter before any kernel is defined.
"""
import importlib
import importlib.util
from functools import cache

import torch

from nanovllm.core.registry import KernelQuery
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata

BACKEND = "cuda"
_PACKAGE = "nanovllm.backends.cuda"


@cache
def _module(name: str):
    return importlib.import_module(f"{_PACKAGE}.{name}")


# ---- the kernels, as the registry's ops call them ------------------------------------------------
# k_scale, v_scale: [num_kv_heads] float32, passed only with an FP8 KV cache (stored = value / scale)
def triton_store(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    _module("kv_store").store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def triton_paged_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, meta: PrefillMetadata, scale: float,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _module("attention.triton_prefill").prefill_attention(q, k, v, k_cache, v_cache, meta, scale,
                                                                 k_scale, v_scale)


def torch_flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: PrefillMetadata, scale: float,
                        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _module("attention.torch_flash").prefill_attention(q, k, v, k_cache, v_cache, meta, scale,
                                                              k_scale, v_scale)


def flash_attn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    return _module("attention.flash_attn").prefill_attention(q, k, v, k_cache, v_cache, meta, scale)


def triton_sampler(logits: torch.Tensor, params) -> torch.Tensor:
    return _module("sampler").sample(logits, params)


def triton_rotary_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float):
    return _module("elementwise").rotary_qk(positions, q, k, cos_sin_cache, q_weight, k_weight, eps)


def triton_rotary_qk_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                           eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                           return_k: bool, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           **row_scale):
    """`row_scale`: rotary_store's row_scale_of / row_eps (the folded norms), beyond the op's arguments."""
    return _module("rotary_store").rotary_qk_store(positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps,
                                                   k_cache, v_cache, slot_mapping, return_k, k_scale, v_scale,
                                                   **row_scale)


def triton_silu_mul(x: torch.Tensor, **row_scale) -> torch.Tensor:
    """`row_scale`: elementwise.silu_mul's row_scale_of / eps (the folded norms), beyond the op's argument."""
    return _module("elementwise").silu_mul(x, **row_scale)


def triton_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return _module("elementwise").add_rms_norm(x, residual, weight, eps)


def triton_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                        scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _module("attention.triton_decode").decode_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale)


def flash_attn_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                      scale: float) -> torch.Tensor:
    return _module("attention.flash_attn").decode_attention(q, k_cache, v_cache, meta, scale)


# ---- checks: each returns the reasons a kernel cannot serve a query (empty = usable) --------------
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _device_reasons(query: KernelQuery, min_capability: tuple[int, int] = (0, 0)) -> list[str]:
    if query.device_type != "cuda":
        return [f"needs CUDA (device_type is {query.device_type})"]
    if not torch.cuda.is_available():
        return ["needs CUDA (torch.cuda.is_available() is False)"]
    capability = torch.cuda.get_device_capability()
    if capability < min_capability:
        return [f"needs compute capability >= {min_capability[0]}.{min_capability[1]}, "
                f"the GPU has {capability[0]}.{capability[1]}"]
    if query.dtype == torch.bfloat16 and capability < (8, 0):
        return [f"bfloat16 needs compute capability >= 8.0, the GPU has {capability[0]}.{capability[1]}"]
    return []


def check_triton(query: KernelQuery) -> list[str]:
    reasons = _device_reasons(query) + query.head_reasons()
    if not _installed("triton"):
        reasons.append("triton is not installed")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {query.dtype} is not float16, bfloat16 or float32")
    if not 1 <= query.head_dim <= 256:  # other than powers of two are padded to one inside the kernels
        reasons.append(f"head_dim {query.head_dim} is not in [1, 256]")
    if query.kv_is_fp8 and (query.head_dim % 2 or query.head_dim <= 16):  # decode reads V in byte pairs
        reasons.append(f"an FP8 KV cache needs an even head_dim above 16, got {query.head_dim}")
    if query.kv_is_fp8 and not reasons and torch.cuda.get_device_capability() < (8, 9):
        reasons.append("an FP8 KV cache needs compute capability >= 8.9 (Triton's FP8 conversions), the GPU has "
                       "{}.{}".format(*torch.cuda.get_device_capability()))
    return reasons


def check_triton_sampler(query: KernelQuery) -> list[str]:
    reasons = _device_reasons(query)
    if not _installed("triton"):
        reasons.append("triton is not installed")
    return reasons


def check_torch_flash(query: KernelQuery) -> list[str]:
    reasons = _device_reasons(query, min_capability=(8, 0)) + query.head_reasons()
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        reasons.append(f"torch {torch.__version__} has no aten._flash_attention_forward")
    if query.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {query.dtype} is not float16 or bfloat16")
    if query.head_dim % 8 or query.head_dim > 256:
        reasons.append(f"head_dim {query.head_dim} is not a multiple of 8 up to 256")
    # batches with a cached prefix go to the Triton paged prefill
    reasons += [f"for cached prefixes: {r}" for r in check_triton(query) if r not in reasons]
    return reasons


def check_flash_attn(query: KernelQuery) -> list[str]:
    reasons = _device_reasons(query, min_capability=(8, 0)) + query.head_reasons()
    if not _installed("flash_attn"):
        reasons.append("flash_attn is not installed")
    if query.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {query.dtype} is not float16 or bfloat16")
    if query.head_dim % 8 or query.head_dim > 256:
        reasons.append(f"head_dim {query.head_dim} is not a multiple of 8 up to 256")
    if query.block_size % 256:
        reasons.append(f"block_size must be a multiple of 256 (it is {query.block_size})")
    return reasons


def register_cuda_kernels(registry) -> None:
    """Add the cuda backend's kernels to `registry`; called by the cuda plugin's registration hook."""
    registry.register("kv_cache.store", BACKEND, "triton", triton_store, priority=10, check=check_triton,
                      graph_safe=True)
    registry.register("attention.prefill", BACKEND, "flash_attn", flash_attn_prefill, priority=30,
                      check=check_flash_attn)
    # Triton's prefill serves every step by default: on an H200 PyTorch's FA2 varlen took 1.4-1.7x its time on
    # steps with no cached prefix (RESULTS.md, round twenty-three); torch_flash stays a candidate for tune
    registry.register("attention.prefill", BACKEND, "triton_paged", triton_paged_prefill, priority=20,
                      check=check_triton)
    registry.register("attention.prefill", BACKEND, "torch_flash", torch_flash_prefill, priority=15,
                      check=check_torch_flash, fallback="cuda/triton_paged for batches with a cached prefix")
    registry.register("sampler", BACKEND, "triton_split", triton_sampler, priority=10, check=check_triton_sampler,
                      graph_safe=True,
                      fallback="core/sampling/topk_candidates for top-k batches, cpu_ref/torch for other "
                               "top-p or min-p batches and for seeded requests")
    registry.register("rotary.qk", BACKEND, "triton", triton_rotary_qk, priority=10, check=check_triton,
                      graph_safe=True)
    registry.register("rotary.qk_store", BACKEND, "triton", triton_rotary_qk_store, priority=10,
                      check=check_triton, graph_safe=True)
    registry.register("act.silu_mul", BACKEND, "triton", triton_silu_mul, priority=10,
                      check=check_triton, graph_safe=True)
    registry.register("norm.add_rms", BACKEND, "triton", triton_add_rms_norm, priority=10,
                      check=check_triton, graph_safe=True)
    registry.register("attention.decode", BACKEND, "flash_attn", flash_attn_decode, priority=30,
                      check=check_flash_attn, graph_safe=True)
    registry.register("attention.decode", BACKEND, "triton_paged", triton_paged_decode, priority=10,
                      check=check_triton, graph_safe=True)
