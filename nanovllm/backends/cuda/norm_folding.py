"""Fold each decoder layer's two RMSNorms into the kernels around them: nine launches a layer become seven.

RMSNorm(r) = (r * s) * g, where s = rsqrt(mean(r^2) + eps) is one number a row and g a weight a column. So the
product after it is W (s r g) = s ((W g) r): g goes into W's columns once, at start-up, and s is applied to the
product's output by the kernel that reads it next, which computes s from r's row itself. The residual adds go
into the o and down products, as cuBLAS's C += A B on the residual. A layer's step is then:

    qkv = (W_qkv g1) r                        cuBLAS
    q, k, v scaled by s(r), q/k norm, rotary, K and V into the cache     one Triton launch (rotary_store.py)
    attention                                 the plan's kernel
    r += W_o attention                        cuBLAS, beta = 1
    gate_up = (W_gate_up g2) r                cuBLAS
    silu(gate * s(r)) * (up * s(r))           one Triton launch (elementwise.py)
    r += W_down silu_mul                      cuBLAS, beta = 1

instead of the two residual add + RMSNorm launches besides. The engine's model code does not change: the cuda
backend's `prepare_model` folds a model (`fold_norms`) when its layers run exactly this backend's own `rotary.qk_store`,
`act.silu_mul` and `norm.add_rms` kernels (not the reference's, not shadow-verified wrappers), it runs on one
device, has no biases, and the `fold_norms` option is on. Each value is rounded where the unfolded path rounds
it (the scaled q/k/v and gate/up to the dtype), so float32 runs give cpu_ref's greedy tokens.
"""
import types

import torch

from nanovllm.backends.cuda import kernels
from nanovllm.backends.cuda.linear import TritonLinear, matmul, pick
from nanovllm.models.decoder import DecoderModel

NOT_OWN = " itself (the reference, another kernel, or a verification wrapper)"


def why_not_foldable(model: torch.nn.Module) -> str:
    """Why `model`'s norms cannot be folded here ("" when they can)."""
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, DecoderModel):
        return f"{type(model).__name__} is not a decoder of models/decoder.py"
    if "forward" in vars(decoder):
        return "its forward was replaced already (folded once: the weights hold the norms)"
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj.ctx.tp_size != 1:
            return "tensor parallelism (the residual adds would be all-reduced tp times)"
        if any(p.bias is not None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            return "the model's products have biases"
        if attn.rotary_qk_store is not kernels.triton_rotary_qk_store:
            return f"the plan's rotary.qk_store is not cuda/triton{NOT_OWN}"
        if mlp.act_fn.kernel is not kernels.triton_silu_mul:
            return f"the plan's act.silu_mul is not cuda/triton{NOT_OWN}"
        if layer.input_layernorm.add_kernel is not kernels.triton_add_rms_norm:
            return f"the plan's norm.add_rms is not cuda/triton{NOT_OWN}"
    return ""


@torch.no_grad()
def fold_norms(model: torch.nn.Module) -> str:
    """Fold the layers' RMSNorm weights into the products after them and give the decoder the folded forward;
    returns why it did not ("" when it did). Call once, after the weights are loaded."""
    why = why_not_foldable(model)
    if why:
        return why
    decoder = model.model
    for layer in decoder.layers:
        layer.self_attn.qkv_proj.weight.mul_(layer.input_layernorm.weight)  # [N, K] * [K]: column k times g[k]
        layer.mlp.gate_up_proj.weight.mul_(layer.post_attention_layernorm.weight)
    decoder.forward = types.MethodType(folded_forward, decoder)
    return ""


def folded_forward(decoder, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
    """DecoderModel.forward with the norms folded: the residual stream r is updated in place, layer by layer."""
    r = decoder.embed_tokens(input_ids)
    for layer in decoder.layers:
        attention_block(layer, positions, r, meta)
        mlp_block(layer, r)
    return decoder.norm(r)


def attention_block(layer, positions: torch.Tensor, r: torch.Tensor, meta) -> None:
    """r += o_proj(attention(q, k, v)), with q, k, v = s(r) * (W_qkv g1) r."""
    sa, eps = layer.self_attn, layer.input_layernorm.eps
    q, k, v = sa.split_qkv(sa.qkv_proj(r))
    if sa.attn.k_cache.numel():
        q, k = sa.qk_transform_store(positions, q, k, v, meta, row_scale_of=r, row_eps=eps)
        out = sa.attn(q, k, v, meta, stored=True)  # with a prefill, v was scaled in place
    else:  # the memory warm-up, before the KV cache exists
        scale = torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + eps)[:, :, None]
        q, k, v = ((t.float() * scale).to(t.dtype) for t in (q, k, v))
        out = sa.attn(*sa.qk_transform(positions, q, k), v, meta)
    add_product(sa.o_proj, out.flatten(1), r)


def mlp_block(layer, r: torch.Tensor) -> None:
    """r += down_proj(silu(gate * s(r)) * (up * s(r))), with gate, up = (W_gate_up g2) r."""
    mlp = layer.mlp
    act = mlp.act_fn.kernel(mlp.gate_up_proj(r), row_scale_of=r, eps=layer.post_attention_layernorm.eps)
    add_product(mlp.down_proj, act, r)


def add_product(linear, x: torch.Tensor, residual: torch.Tensor) -> None:
    """residual += x @ linear.weight.T: one cuBLAS call with beta = 1, or the layer's Triton product then an add
    where its table takes that many rows (cuBLAS's matrix-vector path at one row is slower than both)."""
    config = pick(x.shape[0], *linear.weight.shape) if isinstance(linear.linear_op, TritonLinear) else None
    if config is not None:
        residual.add_(matmul(x, linear.weight, config))
    else:
        residual.addmm_(x, linear.weight.t())
