"""A decode step as two half-batches on two CUDA streams: one half's products run beside the other half's attention.

At a large batch a decode step is mostly attention, which reads the KV cache at the memory's bandwidth. The rest
of a layer is six short launches (four cuBLAS products, two Triton kernels) that each pay a fixed latency above
their weight read (launch, pipeline fill, tail: ~4 us a product on an H200, RESULTS.md "GEMMs at decode sizes")
with most SMs idle. The two halves of a batch do not depend on each other, so with each half's layers on a
stream of its own the GPU can run one half's products in the SM slots and memory time the other half's attention
leaves free. The halves join before the final norm; the LM head and the sampler run once over the whole batch.

    main stream:  embed, qkv A0 | attention A0 | o, mlp A0 | qkv A1 | attention A1 | ...      | join, norm, LM head
    side stream:                | qkv B0 | attention B0 | o, mlp B0 | qkv B1 | attention B1 ... |

The side stream forks after the first half's layer-0 q/k/v, so the chains start out of phase. Both run inside
the decode graphs (`graphs.py`), which capture the fork and the join. The cost: each layer's weights are read
twice (~31 MB a layer for Qwen3-0.6B, ~7 us at 4.2 TB/s), so it pays only where attention is long.

It drives a folded decoder (`norm_folding.py`), whose residual stream is updated in place: the halves are row views
of one tensor, so joining them copies nothing. The decode attention kernels see two batches of half the rows.
"""
import torch

from nanovllm.backends.cuda.norm_folding import attention_inputs, attention_output, is_folded, mlp_block
from nanovllm.core.step_metadata import DecodeMetadata, StepMetadata


def why_not_two_streams(model: torch.nn.Module) -> str:
    """Why `model`'s decode steps cannot run as two half-batches ("" when they can)."""
    decoder = getattr(model, "model", None)
    if decoder is None or not is_folded(decoder):
        return "its RMSNorms are not folded (fold_norms is off, or the model or plan cannot fold them)"
    return ""


def split_decode_meta(meta: StepMetadata, half: int) -> tuple[StepMetadata, StepMetadata]:
    """A decode-only step's metadata as the metadata of its rows [:half] and [half:] (views, no copies)."""
    d = meta.decode
    if meta.prefill is not None or d is None or d.seq_order is not None:
        raise ValueError("only decode steps in batch order split into halves")
    return tuple(
        StepMetadata(meta.slot_mapping[rows], 0, None,
                     DecodeMetadata(d.context_lens[rows], d.block_tables[rows], d.max_context_len),
                     meta.logits_indices[rows])  # unused by the decoder
        for rows in (slice(0, half), slice(half, None)))


class TwoStreamDecode:
    """`model`'s decoder forward over a decode step, as two half-batches on two streams (see the module doc)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        why = why_not_two_streams(model)
        if why:
            raise ValueError(f"decode steps cannot run on two streams: {why}")
        self.decoder = model.model
        self.side = torch.cuda.Stream(device)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 halves: tuple[StepMetadata, StepMetadata]) -> torch.Tensor:
        """Hidden states [num_seqs, hidden] after the final norm; `halves` from `split_decode_meta`."""
        decoder, side, main = self.decoder, self.side, torch.cuda.current_stream()
        h = halves[0].slot_mapping.numel()
        r = decoder.embed_tokens(input_ids)  # alive until after the join: the side stream writes its rows
        ra, rb, pa, pb = r[:h], r[h:], positions[:h], positions[h:]
        for i, layer in enumerate(decoder.layers):
            inputs_a = attention_inputs(layer, pa, ra, halves[0])
            if i == 0:
                side.wait_stream(main)
            with torch.cuda.stream(side):
                attention_output(layer, rb, halves[1], *attention_inputs(layer, pb, rb, halves[1]))
                mlp_block(layer, rb)
            attention_output(layer, ra, halves[0], *inputs_a)
            mlp_block(layer, ra)
        main.wait_stream(side)
        return decoder.norm(r)
