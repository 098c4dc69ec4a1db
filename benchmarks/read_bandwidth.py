"""How fast can a kernel only read HBM, against the copy bandwidth the seed benchmark's floor uses?

The bf16 decode kernel reads K/V at 1.00-1.02 of the copy bandwidth (bytes read + written by a large copy, over
its time), the FP8 one at 0.935. If a kernel that only reads gets well above the copy figure, attention has room
left; if not, it is at the memory's limit and #18's gap is all outside attention. Measured here: a large copy,
torch's sum (read-bound, float32 accumulator), and a Triton kernel reading the buffer in 32 KiB pages (one
16-token page of 8 bf16 heads of 128: what the decode kernel reads a program at a time), each timed as the median
of CUDA-graph replays of several passes over 2-8 GiB (far beyond the 60 MB L2).

    python benchmarks/read_bandwidth.py [--gib 4] [--json out.json]
"""
import argparse
import json

import torch
import triton
import triton.language as tl


@triton.jit
def _read_pages_kernel(x_ptr, out_ptr, numel, PAGE: tl.constexpr, PAGES_PER_PROGRAM: tl.constexpr):
    """Sum PAGES_PER_PROGRAM consecutive pages of PAGE bf16 values a program (one float32 partial out). `numel` is
    passed as a number of its own: from 2^31 elements up Triton types it int64, where pages * PAGE overflowed."""
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, PAGE)
    acc = tl.zeros([PAGE], dtype=tl.float32)
    for i in range(PAGES_PER_PROGRAM):
        page = pid * PAGES_PER_PROGRAM + i
        index = page * PAGE + offs
        acc += tl.load(x_ptr + index, mask=index < numel, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def read_pages(x: torch.Tensor, out: torch.Tensor, page: int, per_program: int, warps: int) -> None:
    pages = x.numel() // page
    _read_pages_kernel[(triton.cdiv(pages, per_program),)](x, out, pages * page, PAGE=page,
                                                            PAGES_PER_PROGRAM=per_program,
                                                            num_warps=warps)


def graph_time(fn, passes: int = 4, replays: int = 10) -> float:
    """Seconds for one call of `fn`: the median of `replays` replays of a graph of `passes` calls, / passes."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(passes):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / passes)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=4.0, help="bytes read a pass (the copy reads half and writes half)")
    p.add_argument("--json")
    args = p.parse_args()
    nbytes = int(args.gib * (1 << 30))
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    results = {"device": torch.cuda.get_device_name(), "gib": args.gib}
    half = x[: x.numel() // 2]
    dst = torch.empty_like(half)
    results["copy_TBps"] = nbytes / graph_time(lambda: dst.copy_(half)) / 1e12
    results["torch_sum_TBps"] = nbytes / graph_time(lambda: x.sum(dtype=torch.float32)) / 1e12
    page = 16 * 8 * 128  # values: a 16-token page of 8 heads of 128
    out = torch.empty(x.numel() // page, dtype=torch.float32, device="cuda")
    for per_program in (1, 2, 4, 8):
        for warps in (4, 8):
            seconds = graph_time(lambda: read_pages(x, out, page, per_program, warps))
            results[f"triton_pages_{per_program}x_{warps}w_TBps"] = nbytes / seconds / 1e12
    best = max(v for k, v in results.items() if k.endswith("TBps") and k != "copy_TBps")
    results["best_read_over_copy"] = best / results["copy_TBps"]
    for key, value in results.items():
        print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
