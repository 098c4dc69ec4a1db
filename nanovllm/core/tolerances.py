"""How far a kernel's output may stray from its reference twin, per dtype: shared by the parity harness
(`nanovllm.testing`) and shadow verification at run time (`core/shadow.py`)."""
import torch

# dtype -> (atol, rtol) of a kernel's output against the float32-computed reference cast to that dtype
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def max_violation(out: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> float | None:
    """None when |out - expected| <= atol + rtol * |expected| everywhere (NaN only where expected is NaN),
    else the largest absolute error (inf for a NaN where the reference has a number)."""
    out, expected = out.detach().float(), expected.detach().float()
    ok = torch.isclose(out, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bool(ok.all()):
        return None
    return (out - expected).abs().nan_to_num(float("inf"))[~ok].max().item()
