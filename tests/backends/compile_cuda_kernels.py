"""Compile the cuda backend's Triton kernels for an H100 (sm_90) on a machine without a GPU.

This catches what Triton's interpreter cannot: code that does not lower to GPU code, tiles that overflow
shared memory, register spills. It swaps a stand-in driver into Triton so compilation needs no GPU, so
it must run in a process of its own without TRITON_INTERPRET; test_cuda_kernels.py runs it that way.
By hand: `python tests/backends/compile_cuda_kernels.py` prints registers, spills and shared memory.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

SM90_SHARED_MEMORY = 232448  # bytes a block may use on an H100
GROUP, NUM_KV_HEADS, PAGE = 2, 8, 16
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class CompileOnlyDriver:
    """What Triton's JIT asks of a driver to compile a kernel (not to launch one)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def resources(kernel) -> dict:
    """Registers and spill bytes from the cubin (via the cuobjdump Triton ships), shared memory in bytes."""
    found = dict(smem=kernel.metadata.shared, regs=None, spill=None)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        if m := re.search(r"REG:(\d+)", usage):
            found["regs"] = int(m.group(1))
        if m := re.search(r"STACK:(\d+)", usage):
            found["spill"] = int(m.group(1))
    return found


def compile_all() -> list[tuple[str, dict]]:
    from nanovllm.backends.cuda import elementwise, kv_store, rotary_store, sampler
    from nanovllm.backends.cuda.attention import triton_decode as dec, triton_decode_balanced as bal
    from nanovllm.backends.cuda.attention import triton_prefill as pre
    from nanovllm.backends.cuda.attention.triton_common import dot_precision, fp8_dot_dtype, padded_head_dim
    out = []
    for dtype, head_dim in [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 48)]:
        pad = padded_head_dim(head_dim)
        row = NUM_KV_HEADS * head_dim  # cache row stride
        for block_size in (PAGE, 256):
            for kv_dtype in (dtype, *FP8_DTYPES) if dtype == torch.bfloat16 else (dtype,):
                fp8, kv = kv_dtype != dtype, str(kv_dtype).removeprefix("torch.")
                cfg = dec.decode_config(pad, block_size, dtype, kv_dtype)
                for split in (False, True):
                    k = dec._decode_split_kernel.warmup(
                        dtype, kv_dtype, kv_dtype, torch.int32, torch.int32, dtype, torch.float32, torch.float32, 0.1,
                        torch.float32, torch.float32, torch.int32, 64,
                        3 * GROUP * row, head_dim, block_size * row, row, head_dim, 64, GROUP * row, head_dim,
                        GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PAGE_SIZE=block_size,
                        BLOCK_N=cfg.block_n, SPLIT=split, DOT_PRECISION=dot_precision(dtype), KV_FP8=fp8,
                        DOT_DTYPE=fp8_dot_dtype(dtype), ASM=True, ORDERED=split,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, grid=(1,))
                    out.append((f"decode {dtype} kv {kv} d{head_dim} page{block_size} split={split}", resources(k)))
                k = bal._balanced_decode_kernel.warmup(
                    dtype, kv_dtype, kv_dtype, torch.int32, torch.int32, torch.int32, dtype, torch.float32,
                    torch.float32, torch.int32, 0.1, torch.float32, torch.float32, 24,
                    3 * GROUP * row, head_dim, block_size * row, row, head_dim, 64, GROUP * row, head_dim,
                    GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PAGE_SIZE=block_size,
                    BLOCK_N=cfg.block_n, SEQS_PAD=256, DOT_PRECISION=dot_precision(dtype), KV_FP8=fp8,
                    DOT_DTYPE=fp8_dot_dtype(dtype), ASM=True, ORDERED=True,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, grid=(1,))
                out.append((f"balanced decode {dtype} kv {kv} d{head_dim} page{block_size}", resources(k)))
                configs = {pre.prefill_config(pad, dtype, context, fp8) for context in (None, pre.SHORT_CONTEXT)}
                for cfg, paged in itertools.product(configs, (False, True) if not fp8 else (True,)):
                    k = pre._prefill_kernel.warmup(
                        dtype, kv_dtype, kv_dtype, torch.int32, torch.int32, torch.int32, dtype, 0.1,
                        torch.float32, torch.float32, 3 * GROUP * row, head_dim, GROUP * row, head_dim,
                        block_size * row, row, head_dim, row, head_dim, 64, 2,
                        GROUP=GROUP, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PAGE_SIZE=block_size, PAGED=paged,
                        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=dot_precision(dtype), KV_FP8=fp8,
                        DOT_DTYPE=fp8_dot_dtype(dtype), PACK=cfg.heads_per_program(GROUP), num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, grid=(1,))
                    out.append((f"prefill {dtype} kv {kv} d{head_dim} page{block_size} paged={paged} "
                                f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}/pack{cfg.pack}", resources(k)))
        k = dec._decode_combine_kernel.warmup(
            torch.float32, torch.float32, dtype, GROUP * row, head_dim, 3, SPLITS_PAD=dec.MAX_SPLITS,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, num_warps=4, grid=(1,))
        out.append((f"decode combine {dtype} d{head_dim}", resources(k)))
        for kv_dtype in (dtype, *FP8_DTYPES):
            fp8 = kv_dtype != dtype
            k = kv_store._store_kv_kernel.warmup(
                dtype, dtype, kv_dtype, kv_dtype, torch.int64, torch.float32, torch.float32,
                3 * GROUP * row, head_dim, 3 * GROUP * row, head_dim,
                PAGE * row, row, head_dim, PAGE * row, row, head_dim,
                NUM_KV_HEADS=NUM_KV_HEADS, HEADS_PAD=NUM_KV_HEADS, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_SIZE=PAGE,
                FP8=fp8, FP8_MAX=float(torch.finfo(kv_dtype).max) if fp8 else 0.0,
                num_warps=kv_store._num_warps(NUM_KV_HEADS, head_dim), grid=(1,))
            out.append((f"kv store {dtype} kv {str(kv_dtype).removeprefix('torch.')} d{head_dim}", resources(k)))
        half = head_dim // 2
        k = elementwise._qk_norm_rope_kernel.warmup(
            dtype, dtype, dtype, dtype, torch.int64, torch.float32, dtype, dtype, 1e-6,
            3 * GROUP * row, head_dim, 3 * GROUP * row, head_dim, head_dim,
            NUM_HEADS=GROUP * NUM_KV_HEADS, HEADS_PAD=GROUP * NUM_KV_HEADS, NUM_KV_HEADS=NUM_KV_HEADS,
            KV_PAD=NUM_KV_HEADS, HALF=half, HALF_PAD=triton.next_power_of_2(half), HAS_NORM=True, num_warps=4,
            grid=(1,))
        out.append((f"q/k norm + rotary {dtype} d{head_dim}", resources(k)))
        for kv_dtype in (dtype, *FP8_DTYPES):
            fp8 = kv_dtype != dtype
            for return_k, scaled in ((False, False), (True, False), (False, True), (True, True)):
                k = rotary_store._qk_norm_rope_store_kernel.warmup(
                    dtype, dtype, dtype, dtype, dtype, torch.int64, torch.float32, dtype, dtype, 1e-6,
                    kv_dtype, kv_dtype, torch.int64, torch.float32, torch.float32, dtype, 1024, 1e-6,
                    3 * GROUP * row, head_dim, 3 * GROUP * row, head_dim, 3 * GROUP * row, head_dim, head_dim,
                    PAGE * row, row, head_dim, PAGE * row, row, head_dim,
                    NUM_HEADS=GROUP * NUM_KV_HEADS, HEADS_PAD=GROUP * NUM_KV_HEADS, NUM_KV_HEADS=NUM_KV_HEADS,
                    KV_PAD=NUM_KV_HEADS, HALF=half, HALF_PAD=triton.next_power_of_2(half), HEAD_DIM_PAD=pad,
                    HAS_NORM=True, RETURN_K=return_k, BLOCK_SIZE=PAGE, FP8=fp8,
                    FP8_MAX=float(torch.finfo(kv_dtype).max) if fp8 else 0.0, ROW_SCALE=scaled,
                    X_SIZE=1024 if scaled else 1, X_PAD=1024 if scaled else 1, num_warps=4, grid=(1,))
                out.append((f"q/k norm + rotary + store {dtype} kv {str(kv_dtype).removeprefix('torch.')} "
                            f"d{head_dim} k={return_k}{' row-scaled' if scaled else ''}", resources(k)))
            for groups, warps in ((8, 1), (4, 1), (2, 4), (1, 2)):  # rotary_store.launch_shape's shapes
                if NUM_KV_HEADS % groups:
                    continue
                k = rotary_store._qk_norm_rope_store_kernel.warmup(
                    dtype, dtype, dtype, dtype, dtype, torch.int64, torch.float32, dtype, dtype, 1e-6,
                    kv_dtype, kv_dtype, torch.int64, torch.float32, torch.float32, dtype, 1024, 1e-6,
                    3 * GROUP * row, head_dim, 3 * GROUP * row, head_dim, 3 * GROUP * row, head_dim, head_dim,
                    PAGE * row, row, head_dim, PAGE * row, row, head_dim,
                    NUM_HEADS=GROUP * NUM_KV_HEADS // groups, HEADS_PAD=GROUP * NUM_KV_HEADS // groups,
                    NUM_KV_HEADS=NUM_KV_HEADS // groups, KV_PAD=NUM_KV_HEADS // groups, HALF=half,
                    HALF_PAD=triton.next_power_of_2(half), HEAD_DIM_PAD=pad, HAS_NORM=True, RETURN_K=False,
                    BLOCK_SIZE=PAGE, FP8=fp8, FP8_MAX=float(torch.finfo(kv_dtype).max) if fp8 else 0.0,
                    ROW_SCALE=True, X_SIZE=1024, X_PAD=1024, GROUPS=groups, num_warps=warps, grid=(1,))
                out.append((f"q/k norm + rotary + store {dtype} kv {str(kv_dtype).removeprefix('torch.')} "
                            f"d{head_dim} row-scaled, {groups} programs a token of {warps} warps", resources(k)))
        for scaled, block, warps in ((False, 1024, 4), (True, 1024, 4), (True, 4096, 8)):  # decode, prefill
            k = elementwise._silu_mul_kernel.warmup(
                dtype, dtype, 3072, 6144, 3072, dtype, 1024, 1e-6, BLOCK=block, ROW_SCALE=scaled,
                R_SIZE=1024 if scaled else 1, R_PAD=1024 if scaled else 1, num_warps=warps, grid=(1,))
            out.append((f"silu and mul {dtype}{' row-scaled' if scaled else ''} block {block}", resources(k)))
        k = elementwise._add_rms_norm_kernel.warmup(dtype, dtype, dtype, dtype, dtype, 1024, 1e-6, 1024, 1024,
                                                    BLOCK=1024, num_warps=4, grid=(1,))
        out.append((f"residual add + RMSNorm {dtype}", resources(k)))
        stats = (torch.float32, torch.float32, torch.int32)  # per slice: max, sum, first index of the max
        k = sampler._slice_stats_kernel.warmup(
            dtype, 151936, torch.float32, torch.int64, *stats, 151936, 19, SLICE=sampler.SLICE, FAST=True,
            num_warps=sampler._warps(sampler.SLICE), grid=(1,))
        out.append((f"sampler slices {dtype}", resources(k)))
        k = sampler._pick_kernel.warmup(
            dtype, 151936, torch.float32, torch.int64, *stats, torch.int64, 151936, 19, SLICE=sampler.SLICE,
            SLICES=32, BLOCK=sampler.PICK_BLOCK, FAST=True, num_warps=4, grid=(1,))
        out.append((f"sampler pick {dtype}", resources(k)))
    from nanovllm.backends.cuda import linear
    Config = linear.Config
    # the table's configurations, and the swapped and SiLU-fused variants the sweep times
    cases = [(n, k_dim, c, False) for (n, k_dim), entries in linear.TABLE.items() for _, c in entries]
    cases += [(4096, 1024, Config(64, 64, 128, 2, 4, 4, swap=True), False),
              (3072, 1024, Config(64, 64, 128, 2, 8, 4, swap=True), True),
              (3072, 1024, Config(64, 64, 128, 1, 4, 4), True)]
    # the fused gate/up + row-scaled SiLU: GLU_TABLE's configurations and what benchmarks/fused_products.py sweeps
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo
    from benchmarks.fused_products import GLU_CANDIDATES, QKV_CANDIDATES
    glu_configs = {c for entries in linear.GLU_TABLE.values() for _, c in entries if c} | set(GLU_CANDIDATES)
    cases = [(n, k_dim, c, glu, False) for n, k_dim, c, glu in cases]
    cases += [(3072, 1024, c, True, True) for c in sorted(glu_configs)]
    for n, k_dim, c, glu, scaled in cases:
        dtype = torch.bfloat16
        split_types = (torch.float32, torch.int32) if c.split_k > 1 else (dtype, dtype)
        k = linear._linear_kernel.warmup(
            dtype, dtype, dtype, *split_types, 1, n, k_dim, k_dim, n, k_dim // c.split_k, 1e-6,
            BM=c.block_m, BN=c.block_n, BK=c.block_k, SPLIT_K=c.split_k, SWAP=c.swap, GLU=glu, ROW_SCALE=scaled,
            num_warps=c.warps, num_stages=c.stages, grid=(1,))
        out.append((f"linear {n}x{k_dim} {tuple(c)}{' +silu' if glu else ''}{' row-scaled' if scaled else ''}",
                    resources(k)))
    from nanovllm.backends.cuda import qkv_rotary_store as qkv
    qkv_configs = {c for entries in qkv.TABLE.values() for _, c in entries if c} | set(QKV_CANDIDATES)
    dtype = torch.bfloat16
    for c in sorted(qkv_configs):
        for kv_dtype in (dtype, torch.float8_e4m3fn):
            fp8 = kv_dtype != dtype
            k = qkv._qkv_rotary_store_kernel.warmup(
                dtype, dtype, dtype, torch.int64, torch.float32, dtype, dtype, 1e-6, 1e-6,
                kv_dtype, kv_dtype, torch.int64, torch.float32, torch.float32,
                torch.float32, torch.float32, torch.int32,  # split K's partials, sums of squares, counters
                256, 1024, 128, PAGE * 1024, 1024, 128, PAGE * 1024, 1024, 128,
                K=1024, NUM_HEADS=16, NUM_KV_HEADS=8, HALF=64, BM=c.block_m, BK=c.block_k, SWAP=c.swap,
                HAS_NORM=True, BLOCK_SIZE=PAGE, FP8=fp8, FP8_MAX=float(torch.finfo(kv_dtype).max) if fp8 else 0.0,
                PRECISION="tf32", SPLIT=c.split_k, num_warps=c.warps, num_stages=c.stages, grid=(1,))
            out.append((f"qkv + rotary + store {tuple(c)} kv {str(kv_dtype).removeprefix('torch.')}", resources(k)))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: interpreted kernels are not compiled")
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", 90, 32)))
    failures = 0
    print(f"triton {triton.__version__}, target sm_90")
    for name, r in compile_all():
        problems = []
        if r["smem"] > SM90_SHARED_MEMORY:
            problems.append("too much shared memory")
        if r["spill"]:
            problems.append("spills registers")
        failures += bool(problems)
        print(f"  {name:<48} regs {r['regs']}  spill {r['spill']}  smem {r['smem']:>6}  {'; '.join(problems)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
