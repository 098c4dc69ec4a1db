"""Vocab-parallel token embedding and LM head: each rank holds a slice of the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.models.layers.context import LayerContext


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // ctx.tp_size)  # the last rank's slice may be padded
        self.vocab_start = ctx.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.checkpoint_shape = lambda param, shard_id=None: (vocab_size, hidden_size)  # before sharding

    def weight_loader(self, param, loaded, shard_id=None):
        rows = min(self.shard_size, self.vocab_size - self.vocab_start)
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * inside.unsqueeze(-1)
        return self.ctx.comm.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the chosen tokens; with TP the slices are gathered on rank 0 (others return None).
    `linear_op` as in linear.LinearBase."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext, bias: bool = False):
        super().__init__(vocab_size, hidden_size, ctx)
        self.linear_op = F.linear
        if bias:
            raise ValueError("an LM head with bias is not supported")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.linear_op(hidden, self.weight)
        if self.ctx.tp_size == 1:
            return logits
        logits = self.ctx.comm.gather(logits)
        return None if logits is None else logits[:, :self.vocab_size]
