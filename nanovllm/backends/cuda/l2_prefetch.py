"""Decode graphs that prefetch each layer's next weights into L2 while its attention reads the KV cache.

After a layer's attention, a decode step runs four small products (o, gate/up, down, then the next layer's qkv)
whose weights (~31 MB a layer for Qwen3-0.6B) come from HBM: each is a kernel of few tiles whose K loop waits
on the memory's latency, ~4 us above its weight read at every batch size on an H200 (RESULTS.md, "GEMMs at
decode sizes"). Attention runs ~10-250 us a layer before them. So at each layer's attention a small kernel on a
second stream issues `prefetch.global.L2::evict_last` for those weights (one instruction a 128-byte line, no
registers written, no shared memory: it fits beside the attention kernel's programs on every SM), and the
products find their weights in L2. It adds no DRAM traffic: the bytes are read once either way, earlier.

    main stream:  qkv, q/k/v transform | attention                | o | gate/up | SiLU | down | qkv ...
    side stream:                       | prefetch o, gate/up, down, next qkv |

Captured inside the decode graphs (`graphs.py`, option `prefetch_weights`) for a folded decoder
(`norm_folding.py`), whose layer pieces it drives. Prefetches are hints: the tokens are the same with or without.
"""
import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.norm_folding import attention_inputs, attention_output, is_folded, mlp_block

LINE = 128  # bytes a prefetch instruction covers (an L2 line)
PROGRAMS = 32  # programs a weight: a few hundred warps across the GPU, beside attention's


@triton.jit
def _prefetch_kernel(addr_ptr, lines_ptr, BLOCK: tl.constexpr, LINE_BYTES: tl.constexpr, EVICT_LAST: tl.constexpr,
                     ASM: tl.constexpr):
    """Program (p, t) prefetches lines p * BLOCK + i (i < BLOCK), stepping by all programs' BLOCKs, of weight t,
    whose first byte is at address addr_ptr[t] and which spans lines_ptr[t] lines (0: nothing). EVICT_LAST: with
    the L2 hint that keeps the lines past streaming reads."""
    t = tl.program_id(1)
    base = tl.load(addr_ptr + t)
    lines = tl.load(lines_ptr + t)
    sink = tl.zeros([BLOCK], tl.int32)  # the asm's zero results, kept so the compiler keeps the asm
    for first in range(tl.program_id(0) * BLOCK, lines, tl.num_programs(0) * BLOCK):
        line = tl.minimum(first + tl.arange(0, BLOCK), lines - 1)  # the last block repeats the last line
        addr = base + line.to(tl.int64) * LINE_BYTES
        if ASM and EVICT_LAST:
            sink += tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                              dtype=tl.int32, is_pure=False, pack=1)
        elif ASM:
            sink += tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                              dtype=tl.int32, is_pure=False, pack=1)
    tl.store(addr_ptr + t, base, mask=tl.sum(sink) != 0)  # never: the address back in place


def weights_after_attention(decoder) -> list[list[torch.Tensor]]:
    """Per layer, the weights a decode step reads after that layer's attention: its o, gate/up and down products'
    and the next layer's qkv (none after the last layer: the LM head is too big for L2)."""
    layers = decoder.layers
    return [[layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight]
            + ([layers[i + 1].self_attn.qkv_proj.weight] if i + 1 < len(layers) else [])
            for i, layer in enumerate(layers)]


def why_not_prefetch(model: torch.nn.Module) -> str:
    """Why `model`'s decode graphs cannot prefetch weights ("" when they can)."""
    decoder = getattr(model, "model", None)
    if decoder is None or not is_folded(decoder):
        return "its RMSNorms are not folded (fold_norms is off, or the model or plan cannot fold them)"
    return ""


class PrefetchingDecode:
    """`model`'s decoder forward with each layer's next weights prefetched into L2 beside its attention."""

    def __init__(self, model: torch.nn.Module, device: torch.device, evict_last: bool = True):
        why = why_not_prefetch(model)
        if why:
            raise ValueError(f"decode graphs cannot prefetch weights: {why}")
        self.decoder = model.model
        per_layer = weights_after_attention(self.decoder)
        width = max(len(ws) for ws in per_layer)
        addrs = [[w.data_ptr() for w in ws] + [0] * (width - len(ws)) for ws in per_layer]
        lines = [[-(-w.numel() * w.element_size() // LINE) for w in ws] + [0] * (width - len(ws))
                 for ws in per_layer]
        self.addrs = torch.tensor(addrs, dtype=torch.int64, device=device)
        self.lines = torch.tensor(lines, dtype=torch.int64, device=device)
        self.asm, self.evict_last = device.type == "cuda", evict_last
        self.side = torch.cuda.Stream(device)

    def launch(self, layer: int) -> None:
        """Prefetch the weights read after `layer`'s attention (on the current stream)."""
        _prefetch_kernel[(PROGRAMS, self.addrs.shape[1])](self.addrs[layer], self.lines[layer], BLOCK=256,
                                                           LINE_BYTES=LINE, EVICT_LAST=self.evict_last, ASM=self.asm,
                                                           num_warps=4)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm, as the folded forward gives them."""
        decoder, side, main = self.decoder, self.side, torch.cuda.current_stream()
        r = decoder.embed_tokens(input_ids)
        for i, layer in enumerate(decoder.layers):
            inputs = attention_inputs(layer, positions, r, meta)
            side.wait_stream(main)  # after the q/k/v transform: beside attention, not before it
            with torch.cuda.stream(side):
                self.launch(i)
            attention_output(layer, r, meta, *inputs)
            mlp_block(layer, r)
        main.wait_stream(side)
        return decoder.norm(r)
