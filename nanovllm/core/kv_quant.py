"""FP8 KV cache: the dtype names, and quantising with a scale in plain torch (the reference math).

A cached value x is stored as fp8(clamp(x / scale, -max, max)) and read back as fp8 * scale, with one
float32 scale per KV head of a layer for K and one for V (`[num_kv_heads]`; a per-tensor scale is the
same value in every head). The clamp matters: torch's cast turns out-of-range values into NaN (e4m3) or
inf (e5m2), where the Triton kernels saturate.
"""
import torch

# kv_cache_dtype option -> storage dtype; "auto" (None here) keeps the model dtype
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# how a scale is obtained: see core/kv_calibration.py
KV_CACHE_SCALES = ("per_head", "per_tensor", "unit")


def is_fp8(dtype: torch.dtype | None) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: [..., num_kv_heads, head_dim]; scale: [num_kv_heads] float32 -> x / scale in `dtype`, saturated."""
    limit = fp8_max(dtype)
    return (x.float() / scale.float()[:, None]).clamp(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x: [..., num_kv_heads, head_dim] as stored -> float32 values (a cache in the model dtype: just float)."""
    if scale is None or not is_fp8(x.dtype):
        return x.float()
    return x.float() * scale.float()[:, None]
