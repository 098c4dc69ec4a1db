"""Is one persistent Triton kernel running a decode step's chain of products faster than a launch a product?

    python benchmarks/persistent_chain.py [--rows 1,8,32,64,128,256] [--layers 28] [--json F]   (GPU)
    TRITON_INTERPRET=1 python benchmarks/persistent_chain.py --check-cpu       (correctness on CPU: prints OK)
    cd /tmp && python /work/main/benchmarks/persistent_chain.py --compile-check   (sm_90 registers, no GPU)

A layer of Qwen3-0.6B as four products x[M, K] @ W[N, K]^T, (N, K) = q/k/v (4096, 1024), o (1024, 2048), gate/up
(6144, 1024), down (1024, 3072), each reading the first K columns of the one before; 28 layers of distinct random
bf16 weights (too many for L2). Each variant is one CUDA graph of the whole chain: `cublas` (F.linear a product),
`persistent` (one launch; programs take tiles from a queue in dependency order and spin until the m tile of the
product before is stored; PREFETCH 1 loads the tile's first weight block before that wait, 2 also asks L2 for
the rest of its weights) and `triton_separate` (the same tiles, a launch a product). K is split until a product
has a tile per program; the last split to arrive adds the partials. Prints us a layer (median replay / layers),
the ratio to cuBLAS, the final x's max |diff| to cuBLAS over its max |x|, and the weight-read floor at 4.2 TB/s.

Measured (H200, round twenty-three, RESULTS.md): no. The persistent kernel saves ~1.5 us a product against the
same tiles a launch a product, but those tiles are 1.3-2.3x slower than cuBLAS's: the chain takes 1.0x (M = 1) to
2.3x (M = 256) cuBLAS's time a layer.
"""
import argparse
import functools
import itertools
import json
import os
import statistics
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FIELDS = tl.constexpr(9)  # a product's descriptor: first tile, N, K, K splits, weight offset,
#                           input offset, input row stride, output offset, output row stride
LINE = tl.constexpr(64)  # bf16 elements a 128-byte line
HBM_BYTES_PER_S = 4.2e12


@triton.jit
def _wait(done_ptr, desc_ptr, p, mt, m_tiles, BN: tl.constexpr):
    """Spins until every tile of product p - 1 in m tile mt is stored (they are this tile's input)."""
    if p > 0:
        target = tl.cdiv(tl.load(desc_ptr + (p - 1) * FIELDS + 1), BN)
        while tl.atomic_add(done_ptr + (p - 1) * m_tiles + mt, 0, sem="acquire", scope="gpu") < target:
            pass


@triton.jit
def _prefetch_l2(w_rows, k_lo, k_hi):
    """Asks L2 for the weights w_rows[:, k_lo:k_hi], one prefetch a 128-byte line (inline PTX: GPU only)."""
    cols = tl.arange(0, 16) * LINE
    for k in range(k_lo, k_hi, 16 * LINE):
        ptrs = w_rows[:, None] + tl.minimum(k + cols, k_hi - 1)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _tile(desc_ptr, w_ptr, act_ptr, part_ptr, done_ptr, arrive_ptr, p, local, M, m_tiles, per_m,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CHAINED: tl.constexpr, PREFETCH: tl.constexpr,
          PRECISION: tl.constexpr):
    """Tile `local` of product p: BN output columns of m tile mt over one K split. Tiles of a product are
    numbered (n tile, split, m tile) from the slowest; splits of one tile share the slot mt * per_m + n tile."""
    desc = desc_ptr + p * FIELDS
    n_size, k_size, splits = tl.load(desc + 1).to(tl.int32), tl.load(desc + 2).to(tl.int32), tl.load(desc + 3)
    mt, s, nt = local % m_tiles, local // m_tiles % splits, local // m_tiles // splits
    k_span = tl.multiple_of((k_size // splits).to(tl.int32), 16)  # offsets and strides: multiples of 16 (Plan)
    k_lo = s.to(tl.int32) * k_span
    k_hi = k_lo + k_span
    rows, cols, ks = mt * BM + tl.arange(0, BM), nt * BN + tl.arange(0, BN), tl.arange(0, BK)
    m_ok, n_ok = rows < M, cols < n_size
    w_base = w_ptr + tl.multiple_of(tl.load(desc + 4), 16)  # int64 bases, int32 offsets within a matrix
    w_offs = cols[:, None] * tl.multiple_of(k_size, 16) + ks[None, :]
    x_base = act_ptr + tl.multiple_of(tl.load(desc + 5), 16)
    x_offs = rows[:, None] * tl.multiple_of(tl.load(desc + 6).to(tl.int32), 16) + ks[None, :]
    if PREFETCH:  # weights do not depend on the product before: their reads overlap the wait
        w = tl.load(w_base + k_lo + w_offs, mask=n_ok[:, None], other=0.0)
    if PREFETCH == 2:
        _prefetch_l2(w_base + cols.to(tl.int64) * k_size, k_lo + BK, k_hi)
    if CHAINED:
        _wait(done_ptr, desc_ptr, p, mt, m_tiles, BN)
    if not PREFETCH:
        w = tl.load(w_base + k_lo + w_offs, mask=n_ok[:, None], other=0.0)
    # activations were written by other programs of this launch: read them from L2 (.cg), not a stale L1
    x = tl.load(x_base + k_lo + x_offs, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
    acc = tl.dot(x, tl.trans(w), input_precision=PRECISION)
    for k in range(k_lo + BK, k_hi, BK):
        w = tl.load(w_base + k + w_offs, mask=n_ok[:, None], other=0.0)
        x = tl.load(x_base + k + x_offs, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    out_base = act_ptr + tl.multiple_of(tl.load(desc + 7), 16)
    out_ptrs = out_base + rows[:, None] * tl.multiple_of(tl.load(desc + 8).to(tl.int32), 16) + cols[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    last = splits == 1
    if splits > 1:
        part = (part_ptr + (mt * per_m + nt * splits) * BM * BN
                + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :])
        tl.store(part + s * BM * BN, acc)
        tl.debug_barrier()  # every thread's partial is stored before the count says so
        slot = arrive_ptr + mt * per_m + nt
        last = tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == splits - 1
        if last:  # the last split adds every partial in split order: the same sum whichever split ends last
            acc = tl.zeros_like(acc)
            for i in range(0, splits):
                acc += tl.load(part + i * BM * BN, cache_modifier=".cg")
            tl.atomic_xchg(slot, 0)  # ready for the next product (ordered before the release below)
    if last:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
        if CHAINED:
            tl.debug_barrier()  # every thread's store is issued before one thread's release counts the tile
            tl.atomic_add(done_ptr + p * m_tiles + mt, 1, sem="release", scope="gpu")


@triton.jit
def _persistent_kernel(desc_ptr, w_ptr, act_ptr, part_ptr, queue_ptr, done_ptr, arrive_ptr, M, per_m, products,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Takes tiles in order from queue_ptr[0] until none is left; a tile waits only on tiles taken before it,
    whose programs are running, so no grid size deadlocks. The last program out zeroes the counters."""
    m_tiles = tl.cdiv(M, BM)
    total = tl.load(desc_ptr + products * FIELDS)  # the first tile of a product past the last
    p = tl.program_id(0) * 0  # the product of this program's last tile: tiles only increase
    t = tl.atomic_add(queue_ptr, 1)
    while t < total:
        while t >= tl.load(desc_ptr + (p + 1) * FIELDS):
            p += 1
        _tile(desc_ptr, w_ptr, act_ptr, part_ptr, done_ptr, arrive_ptr, p, t - tl.load(desc_ptr + p * FIELDS),
              M, m_tiles, per_m, BM, BN, BK, True, PREFETCH, PRECISION)
        t = tl.atomic_add(queue_ptr, 1)
    if tl.atomic_add(queue_ptr + 1, 1) == tl.num_programs(0) - 1:  # every other program has left
        tl.store(queue_ptr + tl.arange(0, 2), tl.zeros([2], tl.int32))
        for i in range(0, products * m_tiles, 1024):
            idx = i + tl.arange(0, 1024)
            tl.store(done_ptr + idx, tl.zeros([1024], tl.int32), mask=idx < products * m_tiles)


@triton.jit(do_not_specialize=["p"])
def _product_kernel(desc_ptr, w_ptr, act_ptr, part_ptr, arrive_ptr, M, per_m, p, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr, PRECISION: tl.constexpr):
    """Product p, a program a tile: no waits (the launch before has ended), so no done counters."""
    _tile(desc_ptr, w_ptr, act_ptr, part_ptr, arrive_ptr, arrive_ptr, p, tl.program_id(0), M, tl.cdiv(M, BM),
          per_m, BM, BN, BK, False, PREFETCH, PRECISION)


class Config(NamedTuple):
    bn: int
    bk: int
    warps: int = 4
    stages: int = 3
    prefetch: int = 1
    max_split: int = 8

    @property
    def name(self) -> str:
        return f"bn{self.bn} bk{self.bk} w{self.warps} s{self.stages} pf{self.prefetch} split<={self.max_split}"


SWEEP = [Config(bn, bk) for bn in (32, 64, 128) for bk in (64, 128)] + [
    Config(64, 128, prefetch=0), Config(64, 128, prefetch=2), Config(64, 128, max_split=1)]
QUICK = [Config(32, 64), Config(64, 128), Config(64, 128, prefetch=0), Config(64, 128, max_split=1)]


def product_shapes(hidden: int) -> list[tuple[int, int]]:
    """(N, K) of a layer's products: q/k/v, o, gate/up, down."""
    return [(4 * hidden, hidden), (hidden, 2 * hidden), (6 * hidden, hidden), (hidden, 3 * hidden)]


class Weights:
    """Every product's weight [N, K], std 1/sqrt(K), as views of one flat buffer."""

    def __init__(self, layers: int, hidden: int, dtype: torch.dtype, device: str):
        shapes = product_shapes(hidden) * layers
        self.hidden, self.offsets = hidden, [0, *itertools.accumulate(n * k for n, k in shapes)]
        self.flat = torch.empty(self.offsets[-1], dtype=dtype, device=device)
        self.views = [self.flat[o:o + n * k].view(n, k) for o, (n, k) in zip(self.offsets, shapes)]
        for w in self.views:
            w.normal_(0.0, w.shape[1] ** -0.5)


class Chain:
    """M rows through the chain: each product kind's output, then x0, as regions (offset, row stride) of one
    activation buffer."""

    def __init__(self, weights: Weights, m: int):
        widths = [n for n, _ in product_shapes(weights.hidden)] + [weights.hidden]
        self.regions = [(sum(widths[:i]) * m, width) for i, width in enumerate(widths)]
        self.weights, self.m = weights, m
        self.act = torch.empty(sum(widths) * m, dtype=weights.flat.dtype, device=weights.flat.device)
        self.x0 = self.act[self.regions[4][0]:].view(m, -1).normal_()
        self.out = self.act[self.regions[3][0]:self.regions[4][0]].view(m, -1)

    def clear(self):
        """Fills every output region with NaN: a tile reading what was not yet written shows."""
        self.act[:self.regions[4][0]].fill_(float("nan"))


def split_count(n_tiles: int, k: int, bk: int, programs: int, max_split: int) -> int:
    """The fewest power-of-two K splits giving a product a tile per program (K / splits a multiple of bk)."""
    s = 1
    while n_tiles * s < programs and s < max_split and k % (2 * s * bk) == 0:
        s *= 2
    return s


class Plan:
    """One chain under one config: the descriptors (a row a product, then one holding the tile count) and the
    scratch both Triton variants use."""

    def __init__(self, chain: Chain, cfg: Config, programs: int, bm_max: int):
        self.bm = min(max(16, triton.next_power_of_2(chain.m)), bm_max)
        m_tiles = triton.cdiv(chain.m, self.bm)
        rows, self.tiles = [], []
        for i, w in enumerate(chain.weights.views):
            (n, k), n_tiles = w.shape, triton.cdiv(w.shape[0], cfg.bn)
            splits = split_count(n_tiles * m_tiles, k, cfg.bk, programs, cfg.max_split)
            inp = chain.regions[4 if i == 0 else (i - 1) % 4]
            rows.append([sum(self.tiles), n, k, splits, chain.weights.offsets[i], *inp, *chain.regions[i % 4]])
            self.tiles.append(n_tiles * splits * m_tiles)
        assert all(r[2] % (r[3] * cfg.bk) == 0 and all(v % 16 == 0 for v in r[4:]) for r in rows), \
            "K splits must be multiples of bk, offsets and strides multiples of 16"
        self.per_m = max(triton.cdiv(r[1], cfg.bn) * r[3] for r in rows)
        self.desc = torch.tensor(rows + [[sum(self.tiles)] + [0] * (FIELDS.value - 1)], device=chain.act.device)
        done = len(rows) * m_tiles
        self.counters = torch.zeros(2 + done + m_tiles * self.per_m, dtype=torch.int32, device=chain.act.device)
        self.queue, self.done, self.arrive = self.counters[:2], self.counters[2:2 + done], self.counters[2 + done:]
        self.partials = torch.empty(m_tiles * self.per_m * self.bm * cfg.bn, device=chain.act.device)
        self.precision = "ieee" if chain.act.dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit


def run_cublas(chain: Chain) -> torch.Tensor:
    x = chain.x0
    for w in chain.weights.views:
        x = F.linear(x[:, :w.shape[1]], w)
    return x


def run_persistent(chain: Chain, plan: Plan, cfg: Config, programs: int) -> torch.Tensor:
    _persistent_kernel[(programs,)](
        plan.desc, chain.weights.flat, chain.act, plan.partials, plan.queue, plan.done, plan.arrive, chain.m,
        plan.per_m, len(plan.tiles), BM=plan.bm, BN=cfg.bn, BK=cfg.bk, PREFETCH=cfg.prefetch,
        PRECISION=plan.precision, num_warps=cfg.warps, num_stages=cfg.stages)
    return chain.out


def run_separate(chain: Chain, plan: Plan, cfg: Config) -> torch.Tensor:
    for p, tiles in enumerate(plan.tiles):
        _product_kernel[(tiles,)](
            plan.desc, chain.weights.flat, chain.act, plan.partials, plan.arrive, chain.m, plan.per_m, p,
            BM=plan.bm, BN=cfg.bn, BK=cfg.bk, PREFETCH=min(cfg.prefetch, 1), PRECISION=plan.precision,
            num_warps=cfg.warps, num_stages=cfg.stages)
    return chain.out


def relative_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check_cpu():
    """Both Triton variants under the interpreter against float32 torch on a small chain: with and without K
    splits and the early weight load, several programs, the persistent kernel twice (its counters reset)."""
    torch.manual_seed(0)
    weights = Weights(layers=2, hidden=64, dtype=torch.float32, device="cpu")
    for m in (3, 20):
        chain = Chain(weights, m)
        ref = run_cublas(chain).clone()
        for cfg in (Config(32, 32, prefetch=1, max_split=8), Config(32, 32, prefetch=0, max_split=1)):
            plan = Plan(chain, cfg, programs=8, bm_max=16)
            runs = [("persistent", lambda: run_persistent(chain, plan, cfg, 8))] * 2
            for name, run in runs + [("triton_separate", lambda: run_separate(chain, plan, cfg))]:
                chain.clear()
                err = relative_diff(run(), ref)
                print(f"M={m} {name} {cfg.name} splits {plan.desc[:4, 3].tolist()}: relative diff {err:.1e}")
                assert err < 1e-3 and not plan.counters.any(), (err, plan.counters)
    print("OK")


def compile_check():
    """Compiles both kernels for sm_90 with no GPU (tests/backends/compile_cuda_kernels.py's stand-in driver)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "backends"))
    from compile_cuda_kernels import CompileOnlyDriver, resources
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", 90, 32)))
    pointers = (torch.int64, torch.bfloat16, torch.bfloat16, torch.float32)  # descriptors, weights, act, partials
    for cfg, bm in itertools.product(SWEEP, (16, 64)):
        kw = dict(BM=bm, BN=cfg.bn, BK=cfg.bk, PRECISION="tf32", num_warps=cfg.warps, num_stages=cfg.stages, grid=(1,))
        chained = _persistent_kernel.warmup(*pointers, *[torch.int32] * 3, 64, 96, 112, PREFETCH=cfg.prefetch, **kw)
        separate = _product_kernel.warmup(*pointers, torch.int32, 64, 96, 5, PREFETCH=min(cfg.prefetch, 1), **kw)
        line = " | ".join(f"{name} regs {r['regs']} spill {r['spill']} smem {r['smem']:6d}" for name, r in (
            ("persistent", resources(chained)), ("separate", resources(separate))))
        print(f"{cfg.name:<36} BM {bm:3d}: {line}")


def capture(run):
    run()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def median_us(graphs: dict, rounds: int, replays: int) -> dict[str, float]:
    """Median time a replay, rounds alternated over the graphs so drift hits every variant alike."""
    times = {name: [] for name in graphs}
    for graph, _ in list(graphs.values()) * 3:  # warm-up
        graph.replay()
    for _ in range(rounds):
        for name, (graph, _) in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / replays)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_rows(weights: Weights, m: int, args, programs: int, sweep: list[Config]) -> dict:
    """-> per variant: us a layer, ratio to cuBLAS, relative diff to cuBLAS, K splits of q/k/v, o, gate/up, down."""
    chain = Chain(weights, m)
    runs = {"cublas": (functools.partial(run_cublas, chain), None)}
    for cfg in sweep:
        plan = Plan(chain, cfg, programs, args.bm_max)
        splits = plan.desc[:4, 3].tolist()
        runs[f"persistent {cfg.name}"] = (functools.partial(run_persistent, chain, plan, cfg, programs), splits)
        if cfg.prefetch == 1:
            runs[f"triton_separate {cfg.name}"] = (functools.partial(run_separate, chain, plan, cfg), splits)
    graphs = {name: capture(run) for name, (run, _) in runs.items()}
    us = median_us(graphs, args.rounds, args.replays)
    results, ref = {}, None
    for name, (graph, out) in graphs.items():
        graph.replay()
        torch.cuda.synchronize()
        ref = out.clone() if ref is None else ref
        results[name] = dict(us_per_layer=us[name] / args.layers, ratio=us[name] / us["cublas"],
                             rel_diff=relative_diff(out, ref), splits=runs[name][1])
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,32,64,128,256")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--programs", type=int, default=0, help="persistent grid (default: the SM count)")
    p.add_argument("--bm-max", type=int, default=64, help="largest m tile")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} configurations, not {len(SWEEP)}")
    p.add_argument("--check-cpu", action="store_true", help="correctness under TRITON_INTERPRET=1")
    p.add_argument("--compile-check", action="store_true", help="compile for sm_90 without a GPU")
    args = p.parse_args()
    if args.check_cpu:
        return check_cpu()
    if args.compile_check:
        return compile_check()
    programs = args.programs or torch.cuda.get_device_properties(0).multi_processor_count
    weights = Weights(args.layers, 1024, torch.bfloat16, "cuda")
    floor = sum(w.numel() * w.element_size() for w in weights.views[:4]) / HBM_BYTES_PER_S * 1e6
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}, "
          f"{programs} programs, {args.layers} layers; weight-read floor {floor:.2f} us/layer")
    report = dict(device=torch.cuda.get_device_name(), layers=args.layers, programs=programs,
                  floor_us_per_layer=floor, rows={})
    for m in [int(v) for v in args.rows.split(",")]:
        report["rows"][m] = bench_rows(weights, m, args, programs, QUICK if args.quick else SWEEP)
        print(f"M={m}")
        for name, r in report["rows"][m].items():
            splits = f"  splits {'/'.join(map(str, r['splits']))}" if r["splits"] else ""
            print(f"  {name:<56} {r['us_per_layer']:7.2f} us/layer  x{r['ratio']:.3f} cublas  "
                  f"diff {r['rel_diff']:.1e}{splits}", flush=True)
        if args.json:  # after each M: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
