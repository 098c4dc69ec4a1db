"""StepMetadata: everything attention needs about one step, built once by the model runner.

Tokens are laid out prefill sequences first, then decode sequences (one token each). All tensors live
on the backend's device; for CUDA graphs they are views of static buffers.
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PrefillMetadata:
    """Varlen prefill of `num_seqs` query chunks.

    cu_seqlens_q: [num_seqs + 1] int32, query token offsets; cu_seqlens_k: [num_seqs + 1] int32, offsets
    of each sequence's whole context (cached prefix + this chunk). `block_tables` is None when no sequence
    has a cached prefix or an earlier chunk, so attention can read K/V straight from this step's tensors;
    otherwise K/V are read from the paged cache through it.
    """
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_tables: torch.Tensor | None = None  # [num_seqs, max_num_blocks] int32
    # query tokens of the sequences with no cached prefix (known on the host when the step is built), or None:
    # not known. Lets a paged kernel decide whether reading those sequences apart is worth a launch
    prefix_free_tokens: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1


@dataclass
class DecodeMetadata:
    """One query token per sequence; context_lens counts the tokens to attend to, this one included."""
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32
    max_context_len: int
    # [num_seqs] int32, the sequences by context length, longest first (ties in batch order), or None: batch order.
    # A hint for kernels that run a program per sequence in several waves, so the longest start first. Decode-only
    # steps leave it None: the scheduler already orders them longest first, and a kernel then reads no order array
    # before its first load (one memory latency less per program)
    seq_order: torch.Tensor | None = None


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding tokens that must not be stored
    num_prefill_tokens: int
    prefill: PrefillMetadata | None
    decode: DecodeMetadata | None
    logits_indices: torch.Tensor  # [num_sampled] int64, the tokens whose logits are computed
    # rows appended to logits_indices after the sampled ones, for prompt logprobs (core/sampling/prompt_logprobs.py):
    # (batch index, first position, number of positions) per sequence
    prompt_logprob_rows: tuple[tuple[int, int, int], ...] = ()


def longest_first(context_lens) -> np.ndarray:
    """DecodeMetadata.seq_order for these context lengths (host ints): the sequences longest first, ties in batch
    order, as int32."""
    return np.argsort(-np.asarray(context_lens), kind="stable").astype(np.int32)
