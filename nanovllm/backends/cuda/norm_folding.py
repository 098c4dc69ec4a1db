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

from nanovllm.backends.cuda import kernels, qkv_rotary_store
from nanovllm.backends.cuda.linear import GLU_TABLE, TABLE_DTYPES, TritonLinear, matmul, pick
from nanovllm.models.decoder import DecoderModel

NOT_OWN = " itself (the reference, another kernel, or a verification wrapper)"


def why_not_foldable(model: torch.nn.Module) -> str:
    """Why `model`'s norms cannot be folded here ("" when they can)."""
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, DecoderModel):
        return f"{type(model).__name__} is not a decoder of models/decoder.py"
    if is_folded(model):
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


def is_folded(model: torch.nn.Module) -> bool:
    """Whether `fold_norms` gave this model's decoder the folded forward."""
    decoder = getattr(model, "model", None)
    return isinstance(decoder, DecoderModel) and "forward" in vars(decoder)


@torch.no_grad()
def fold_norms(model: torch.nn.Module, fuse_products: bool = True) -> str:
    """Fold the layers' RMSNorm weights into the products after them and give the decoder the folded forward;
    returns why it did not ("" when it did). Call once, after the weights are loaded. `fuse_products`: decode
    steps run the q/k/v and gate/up products with their next kernel in the epilogue at the batch sizes their
    tables list (qkv_rotary_store.TABLE, linear.GLU_TABLE): five launches a layer there, not seven."""
    why = why_not_foldable(model)
    if why:
        return why
    decoder = model.model
    decoder.fuse_products = fuse_products
    for layer in decoder.layers:
        layer.self_attn.qkv_proj.weight.mul_(layer.input_layernorm.weight)  # [N, K] * [K]: column k times g[k]
        layer.mlp.gate_up_proj.weight.mul_(layer.post_attention_layernorm.weight)
    decoder.forward = types.MethodType(folded_forward, decoder)
    return ""


def folded_forward(decoder, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
    """DecoderModel.forward with the norms folded: the residual stream r is updated in place, layer by layer."""
    r = decoder.embed_tokens(input_ids)
    fuse = decoder.fuse_products and r.dtype in TABLE_DTYPES
    for layer in decoder.layers:
        attention_block(layer, positions, r, meta, fuse)
        mlp_block(layer, r, fuse)
    return decoder.norm(r)


def fused_qkv_config(sa, r: torch.Tensor, meta) -> qkv_rotary_store.Config | None:
    """The fused q/k/v product's configuration for this step (a decode step whose batch size its table lists),
    or None: the product on cuBLAS, then rotary.qk_store."""
    if meta.prefill is not None or not sa.attn.k_cache.numel():
        return None
    weight = sa.qkv_proj.weight
    config = qkv_rotary_store.pick(r.shape[0], *weight.shape)
    if config is None or qkv_rotary_store.why_not(r, weight, sa.num_heads, sa.num_kv_heads, config):
        return None
    return config


def attention_block(layer, positions: torch.Tensor, r: torch.Tensor, meta, fuse: bool = False) -> None:
    """r += o_proj(attention(q, k, v)), with q, k, v = s(r) * (W_qkv g1) r."""
    sa, eps = layer.self_attn, layer.input_layernorm.eps
    config = fused_qkv_config(sa, r, meta) if fuse else None
    if config is not None:  # one launch: the product, the row scale, q/k norm, rotary and the KV store
        attn = sa.attn
        k_scale, v_scale = attn.kv_scales or (None, None)  # an FP8 cache's
        q = qkv_rotary_store.qkv_rotary_store(
            r, sa.qkv_proj.weight, sa.num_heads, sa.num_kv_heads, positions, sa.rotary_emb.cos_sin_cache,
            *sa.qk_norm_args(), eps, attn.k_cache, attn.v_cache, meta.slot_mapping, k_scale, v_scale, config)
        add_product(sa.o_proj, attn(q, None, None, meta, stored=True).flatten(1), r)
        return
    q, k, v = sa.split_qkv(sa.qkv_proj(r))
    if sa.attn.k_cache.numel():
        q, k = sa.qk_transform_store(positions, q, k, v, meta, row_scale_of=r, row_eps=eps)
        out = sa.attn(q, k, v, meta, stored=True)  # with a prefill, v was scaled in place
    else:  # the memory warm-up, before the KV cache exists
        scale = torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + eps)[:, :, None]
        q, k, v = ((t.float() * scale).to(t.dtype) for t in (q, k, v))
        out = sa.attn(*sa.qk_transform(positions, q, k), v, meta)
    add_product(sa.o_proj, out.flatten(1), r)


def mlp_block(layer, r: torch.Tensor, fuse: bool = False) -> None:
    """r += down_proj(silu(gate * s(r)) * (up * s(r))), with gate, up = (W_gate_up g2) r: the product and the
    row-scaled SiLU-and-mul in one Triton launch where GLU_TABLE lists the batch size, else cuBLAS then
    act.silu_mul."""
    mlp, eps = layer.mlp, layer.post_attention_layernorm.eps
    weight = mlp.gate_up_proj.weight
    config = pick(r.shape[0], *weight.shape, GLU_TABLE) if fuse else None
    if config is not None:
        act = matmul(r, weight, config, glu=True, row_scale_eps=eps)
    else:
        act = mlp.act_fn.kernel(mlp.gate_up_proj(r), row_scale_of=r, eps=eps)
    add_product(mlp.down_proj, act, r)


def add_product(linear, x: torch.Tensor, residual: torch.Tensor) -> None:
    """residual += x @ linear.weight.T: one cuBLAS call with beta = 1, or the layer's Triton product then an add
    where its table takes that many rows (cuBLAS's matrix-vector path at one row is slower than both)."""
    config = pick(x.shape[0], *linear.weight.shape) if isinstance(linear.linear_op, TritonLinear) else None
    if config is not None:
        residual.add_(matmul(x, linear.weight, config))
    else:
        residual.addmm_(x, linear.weight.t())
