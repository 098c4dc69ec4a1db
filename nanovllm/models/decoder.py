"""The decoder every supported model shares: GQA attention with rotary, SwiGLU MLP, RMSNorm, optional
tied embeddings. Models differ only in switches (q/k/v bias, per-head q/k norm), set in tiny subclasses
of `CausalLM` (qwen3.py, qwen2.py, llama.py) or read from the config (`attention_bias`, `mlp_bias`).
"""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.core.kernel_output import check_like, check_pair_like
from nanovllm.core.step_metadata import StepMetadata
from nanovllm.models.layers.activation import SiluAndMul
from nanovllm.models.layers.attention import Attention
from nanovllm.models.layers.context import LayerContext
from nanovllm.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.models.layers.norm import RMSNorm
from nanovllm.models.layers.rotary import RotaryEmbedding, rope_config


def head_dim_of(config) -> int:
    """The attention head dim: config.json's `head_dim`, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def plan_kernel(ctx: LayerContext, op: str):
    """The engine's kernel for an elementwise op, or None (not in the plan: the layers' own torch code runs)."""
    return ctx.kernels.get(op)


@dataclass(frozen=True)
class DecoderOptions:
    """Which optional parts a model has: biases per projection group, and per-head q/k RMSNorm."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


class SelfAttention(nn.Module):
    def __init__(self, config, ctx: LayerContext, opts: DecoderOptions):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, opts.qkv_bias, ctx)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, hidden, opts.o_bias, ctx)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, *rope_config(config))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if opts.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if opts.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, ctx)
        self.rotary_qk = plan_kernel(ctx, "rotary.qk")
        self.rotary_qk_store = plan_kernel(ctx, "rotary.qk_store")
        self.kernel_label = ctx.kernel_label

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv_proj(x))
        if self.rotary_qk_store is not None and self.attn.k_cache.numel():
            q, k = self.qk_transform_store(positions, q, k, v, meta)
            return self.o_proj(self.attn(q, k, v, meta, stored=True).flatten(1))
        q, k = self.qk_transform(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta).flatten(1))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q/k/v projection's output as q [T, heads, D], k and v [T, kv heads, D] (views)."""
        d = self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        return q.view(-1, self.num_heads, d), k.view(-1, self.num_kv_heads, d), v.view(-1, self.num_kv_heads, d)

    def qk_norm_args(self) -> tuple:
        """(q weight, k weight, eps) of the per-head q/k RMSNorm, as the rotary kernels take them ((None, None, 0.0)
        without one)."""
        if self.q_norm is None:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def qk_transform_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           meta: StepMetadata, **kernel_options):
        """`qk_transform` and the KV store in one kernel (the plan's `rotary.qk_store`): the rotated K and V go
        straight into the paged cache; the rotated k comes back only when this step has prefill tokens (their
        attention reads this step's K; decode reads the cache), else None. `kernel_options`: keywords only the
        backend's own kernel takes (the cuda backend's folded norms pass the row scale, norm_folding.py)."""
        attn, return_k = self.attn, meta.prefill is not None
        q_out, k_out = self.rotary_qk_store(
            positions, q, k, v, self.rotary_emb.cos_sin_cache, *self.qk_norm_args(), attn.k_cache, attn.v_cache,
            meta.slot_mapping, return_k, *attn.kv_scales, **kernel_options)
        q_out = check_like(self.kernel_label, "rotary.qk_store", q_out, q)
        return q_out, check_like(self.kernel_label, "rotary.qk_store", k_out, k) if return_k else None

    def qk_transform(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Per-head q/k RMSNorm (Qwen3) then rotary: the plan's `rotary.qk` kernel (one launch where the backend
        fuses it), or elementwise work the runner may fuse with torch.compile."""
        if self.rotary_qk is not None:
            out = self.rotary_qk(positions, q, k, self.rotary_emb.cos_sin_cache, *self.qk_norm_args())
            return check_pair_like(self.kernel_label, "rotary.qk", out, q, k)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary_emb(positions, q, k)


class MLP(nn.Module):
    def __init__(self, config, ctx: LayerContext, opts: DecoderOptions):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], opts.mlp_bias, ctx)
        self.down_proj = RowParallelLinear(size, config.hidden_size, opts.mlp_bias, ctx)
        self.act_fn = SiluAndMul(plan_kernel(ctx, "act.silu_mul"), ctx.kernel_label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, ctx: LayerContext, opts: DecoderOptions):
        super().__init__()
        self.self_attn = SelfAttention(config, ctx, opts)
        self.mlp = MLP(config, ctx, opts)
        add_rms = plan_kernel(ctx, "norm.add_rms")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, add_rms, ctx.kernel_label)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, add_rms, ctx.kernel_label)

    def forward(self, positions, hidden, residual, meta):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config, ctx: LayerContext, opts: DecoderOptions):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(DecoderLayer(config, ctx, opts) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, plan_kernel(ctx, "norm.add_rms"), ctx.kernel_label)

    def forward(self, input_ids, positions, meta):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """A decoder stack with an LM head. `packed_modules_mapping` maps checkpoint names onto merged layers.

    Subclasses set `qkv_bias` (always on, as Qwen2) and `qk_norm`; `attention_bias` (q/k/v and o) and
    `mlp_bias` come from the config, as in transformers' Llama and Qwen3.
    """
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False
    qk_norm = False

    def __init__(self, config, ctx: LayerContext):
        super().__init__()
        activation = getattr(config, "hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"hidden_act={activation!r} is not supported by {type(self).__name__}; supported: silu")
        attention_bias = bool(getattr(config, "attention_bias", False))
        opts = DecoderOptions(qkv_bias=self.qkv_bias or attention_bias, o_bias=attention_bias,
                              mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=self.qk_norm)
        self.model = DecoderModel(config, ctx, opts)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size]"""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        """The paged-attention layers, in order: the runner binds one KV cache to each."""
        return [layer.self_attn.attn for layer in self.model.layers]
