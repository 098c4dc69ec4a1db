"""CUTLASS sm90 GEMMs against cuBLAS on a decode step's products (Qwen3-0.6B: q/k/v, o + residual, gate/up,
down + residual, the LM head), us a call in CUDA graphs over 28 weight copies (weights come from HBM; the LM head
over 4), each CUTLASS output checked against float32 first. Then a layer's four products with their real
dependencies x 28 layers: cuBLAS against the faster of the two per product.

    python benchmarks/cutlass_products/build.py --out .wt-models/cutlass    # here (nvcc, sm_90a)
    python3 benchmarks/cutlass_products.py --lib .wt-models/cutlass [--ms 8,32,64,128,256]   # on the device

Writes $OUT/cutlass_products.json (or /tmp). Round twenty-six, benchmarks/RESULTS.md.
"""
import argparse, ctypes, json, os, sys, time

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.gemm_sweep import graph_us  # noqa: E402

LIBS: dict[str, ctypes.CDLL] = {}  # configuration name -> the library holding it


def load(folder: str) -> None:
    lib = ctypes.CDLL(os.path.join(folder, "libprobe.so"))
    for n in open(os.path.join(folder, "configs.txt")).read().split():
        getattr(lib, n + "_ws").restype = ctypes.c_size_t
        getattr(lib, n + "_ws").argtypes = [ctypes.c_int] * 4
        getattr(lib, n + "_run").restype = ctypes.c_int
        getattr(lib, n + "_run").argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [
            ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        LIBS[n] = lib


SHAPES = {"qkv": (4096, 1024, 0.0), "o": (1024, 2048, 1.0), "gate_up": (6144, 1024, 0.0), "down": (1024, 3072, 1.0),
          "lm_head": (151936, 1024, 0.0)}
LAYERS = 28
SM = ws = None


def cutlass_fn(name, x, w, out, beta):
    m, k = x.shape
    n = w.shape[0]
    lib = LIBS[name]
    need = getattr(lib, name + "_ws")(m, n, k, SM)
    if need > ws.numel():
        raise RuntimeError(f"{name}: workspace {need}")
    run = getattr(lib, name + "_run")

    def f():
        rc = run(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k, beta, ws.data_ptr(), SM,
                 torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"{name}: status {rc}")
    return f


def best_cutlass(row: dict) -> tuple[float, str]:
    """(us, configuration) of the fastest CUTLASS configuration that ran correctly in a row; (9e9, "none") if none."""
    return min([(v, c) for c, v in row.items() if isinstance(v, float) and c != "cublas"] or [(9e9, "none")])


def main():
    global SM, ws
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", action="append", required=True, help="a folder with libprobe.so and configs.txt")
    p.add_argument("--ms", default="8,32,64,128,256")
    a = p.parse_args()
    for folder in a.lib:
        load(folder)
    names = list(LIBS)
    SM = torch.cuda.get_device_properties(0).multi_processor_count
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    ms = [int(v) for v in a.ms.split(",")]
    torch.manual_seed(0)
    results = {}
    t0 = time.time()
    for shape, (n, k, beta) in SHAPES.items():
        copies = 4 if shape == "lm_head" else LAYERS
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        for m in (ms if shape != "lm_head" else [m for m in ms if m >= 64]):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            res = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
            ref = (x.float() @ weights[0].float().t() + beta * res.float())
            outs = [res.clone() for _ in range(copies)]
            row = {}
            if beta:
                row["cublas"] = graph_us(lambda i: outs[i].addmm_(x, weights[i].t()), copies)
            else:
                row["cublas"] = graph_us(lambda i: torch.mm(x, weights[i].t(), out=outs[i]), copies)
            for name in names:
                try:
                    o = res.clone()
                    cutlass_fn(name, x, weights[0], o, beta)()
                    torch.cuda.synchronize()
                    err = (o.float() - ref).abs().max().item()
                    if err > 0.05 + 0.02 * ref.abs().max().item():
                        row[name] = f"wrong {err:.3g}"
                        continue
                    fns = [cutlass_fn(name, x, weights[i], outs[i], beta) for i in range(copies)]
                    row[name] = graph_us(lambda i: fns[i](), copies)
                except Exception as e:
                    row[name] = f"error {e}"[:80]
            best = best_cutlass(row)
            results[f"{shape} M={m}"] = row
            print(f"{shape:8s} M={m:4d} cublas {row['cublas']:.2f} us, best cutlass {best[0]:.2f} ({best[1]}) "
                  f"[{time.time() - t0:.0f} s]", flush=True)
            print("   ", {c: (round(v, 2) if isinstance(v, float) else v) for c, v in row.items()}, flush=True)
    chain(results, [m for m in ms if m >= 32])
    out = os.environ.get("OUT", "/tmp")
    json.dump(results, open(os.path.join(out, "cutlass_products.json"), "w"), indent=1)


def chain(results, ms):
    """A layer's four products with their real dependencies (r -> qkv; attention stand-in -> r += o; r -> gate_up;
    act stand-in -> r += down) x 28 layers in one graph: cuBLAS against the best CUTLASS config of each product."""
    ws_ = {s: [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(LAYERS)]
           for s, (n, k, _) in SHAPES.items() if s != "lm_head"}
    for m in ms:
        r = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
        att = torch.randn(m, 2048, dtype=torch.bfloat16, device="cuda")
        act = torch.randn(m, 3072, dtype=torch.bfloat16, device="cuda")
        qkv = torch.empty(m, 4096, dtype=torch.bfloat16, device="cuda")
        gu = torch.empty(m, 6144, dtype=torch.bfloat16, device="cuda")

        def layer_cublas(i):
            torch.mm(r, ws_["qkv"][i].t(), out=qkv)
            r.addmm_(att, ws_["o"][i].t())
            torch.mm(r, ws_["gate_up"][i].t(), out=gu)
            r.addmm_(act, ws_["down"][i].t())
        best = {}
        for s in ("qkv", "o", "gate_up", "down"):
            row = results[f"{s} M={m}"]
            v, c = best_cutlass(row)
            best[s] = c if v < row["cublas"] else None
        fns = []
        for i in range(LAYERS):
            fs = []
            for s, (x, o, beta) in (("qkv", (r, qkv, 0.0)), ("o", (att, r, 1.0)), ("gate_up", (r, gu, 0.0)),
                                    ("down", (act, r, 1.0))):
                if best[s] is None:
                    w = ws_[s][i]
                    fs.append((lambda x=x, w=w, o=o: o.addmm_(x, w.t())) if beta else
                              (lambda x=x, w=w, o=o: torch.mm(x, w.t(), out=o)))
                else:
                    fs.append(cutlass_fn(best[s], x, ws_[s][i], o, beta))
            fns.append(fs)

        def layer_mixed(i):
            for f in fns[i]:
                f()
        a = graph_us(layer_cublas, LAYERS)
        b = graph_us(layer_mixed, LAYERS)
        results[f"chain M={m}"] = {"cublas": a, "mixed": b, "best": best}
        print(f"chain M={m}: cuBLAS {a:.2f} us a layer, best-of {b:.2f} ({best})", flush=True)


if __name__ == "__main__":
    main()
