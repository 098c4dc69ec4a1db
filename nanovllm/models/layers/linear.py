"""Linear layers, tensor-parallel: column-parallel (plain, merged gate/up, q/k/v) and row-parallel.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's shard
of a checkpoint tensor into it, so the loader never needs to know how a layer is split.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.models.layers.context import LayerContext


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """`linear_op(x, weight, bias)` computes the product; a backend may swap it for one that reads a copy of the
    weight it prepared for its device (`Backend.prepare_model`), so the layers themselves stay device-agnostic."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext):
        super().__init__()
        self.ctx = ctx
        self.linear_op = F.linear
        self.full_input_size = getattr(self, "full_input_size", input_size)  # before TP sharding
        self.full_output_size = getattr(self, "full_output_size", output_size)
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.checkpoint_shape = self.checkpoint_shape
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
            self.bias.checkpoint_shape = self.checkpoint_shape
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)

    def checkpoint_rows(self, shard_id) -> int:
        """Output features of the checkpoint tensor that fills part `shard_id`, before TP sharding."""
        return self.full_output_size

    def checkpoint_shape(self, param: nn.Parameter, shard_id=None) -> tuple[int, ...]:
        """The shape the checkpoint's tensor for `param` (part `shard_id`) must have: the unsharded one."""
        rows = self.checkpoint_rows(shard_id)
        return (rows, self.full_input_size) if param.dim() == 2 else (rows,)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product, as `forward` computes it before any collective."""
        return self.linear_op(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Splits the output features across ranks; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext):
        self.full_output_size = output_size
        super().__init__(input_size, divide(output_size, ctx.tp_size, "output features"), bias, ctx)

    def weight_loader(self, param, loaded, shard_id=None):
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.ctx.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matrix (gate and up); `shard_id` is the part's index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, ctx: LayerContext):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, ctx)

    def checkpoint_rows(self, shard_id) -> int:
        return self.output_sizes[shard_id]

    def weight_loader(self, param, loaded, shard_id=None):
        tp = self.ctx.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.ctx.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix, split by heads. With fewer KV heads than ranks, each KV
    head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 ctx: LayerContext):
        tp = ctx.tp_size
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_head_start = ctx.tp_rank * self.num_kv_heads
        else:
            if tp % num_kv_heads:
                raise ValueError(f"tensor_parallel_size={tp} is not a multiple of num_key_value_heads="
                                 f"{num_kv_heads}: KV heads cannot be replicated evenly")
            self.num_kv_heads = 1
            self.kv_head_start = ctx.tp_rank // (tp // num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, output_size, bias, ctx)

    def checkpoint_rows(self, shard_id) -> int:
        return (self.total_num_heads if shard_id == "q" else self.total_num_kv_heads) * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None):
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            dst, src = param.data.narrow(0, 0, q_size), loaded.narrow(0, self.ctx.tp_rank * q_size, q_size)
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            dst, src = param.data.narrow(0, offset, kv_size), loaded.narrow(0, self.kv_head_start * d, kv_size)
        dst.copy_(src)


class RowParallelLinear(LinearBase):
    """Splits the input features across ranks and all-reduces the partial outputs."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext):
        self.full_input_size = input_size
        super().__init__(divide(input_size, ctx.tp_size, "input features"), output_size, bias, ctx)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: whole on every rank, added once after the reduce
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.ctx.tp_rank * size, size))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_op(x, self.weight)  # the bias is added once, after the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        if self.ctx.tp_size > 1:
            y = self.ctx.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias
