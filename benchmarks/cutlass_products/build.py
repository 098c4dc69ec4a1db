"""Build the CUTLASS probe's kernels (benchmarks/cutlass_products.py) here, where nvcc is, for the device (sm_90a).

    python benchmarks/cutlass_products/build.py --out .wt-models/cutlass [--jobs 2]

CUTLASS's headers come from PyPI's `nvidia-cutlass` wheel (downloaded into --out, not installed). Each
configuration of CONFIGS is one translation unit of gemm.cuh's PROBE (~80 s of nvcc each on one core); they are
linked into --out/libprobe.so with configs.txt beside it. Carry --out to the device (the .so holds sm_90a code
and the CUDA runtime, statically linked) and run `python3 benchmarks/cutlass_products.py --lib <out>` there.
"""
import argparse, glob, os, subprocess, sys, zipfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
PP = "cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized"
WS = "cutlass::gemm::KernelTmaWarpSpecialized, cutlass::epilogue::TmaWarpSpecialized"
CO = "cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative"
SK, PERSISTENT = "cutlass::gemm::StreamKScheduler", "void"
# name: tile M, N, K, cluster M, N, schedules, tile scheduler, swapped (out.T = w @ x.T: the weight on the MMA's M side)
CONFIGS = {
    "n_64x64x128_pp": f"_64, _64, _128, _1, _1, {PP}, {PERSISTENT}, false",
    "n_64x128x64_pp": f"_64, _128, _64, _1, _1, {PP}, {PERSISTENT}, false",
    "n_64x64x64_ws": f"_64, _64, _64, _1, _1, {WS}, {PERSISTENT}, false",
    "n_128x64x64_co": f"_128, _64, _64, _1, _1, {CO}, {PERSISTENT}, false",
    "n_128x128x64_co": f"_128, _128, _64, _1, _1, {CO}, {PERSISTENT}, false",
    "n_128x64x64_sk": f"_128, _64, _64, _1, _1, {CO}, {SK}, false",
    "n_128x128x64_sk": f"_128, _128, _64, _1, _1, {CO}, {SK}, false",
    "n_128x64x64_c21": f"_128, _64, _64, _2, _1, {CO}, {PERSISTENT}, false",
    "n_128x256x64_co": f"_128, _256, _64, _1, _1, {CO}, {PERSISTENT}, false",
    "n_128x256x64_c21": f"_128, _256, _64, _2, _1, {CO}, {PERSISTENT}, false",
    "s_128x64x64_co": f"_128, _64, _64, _1, _1, {CO}, {PERSISTENT}, true",
    "s_128x32x128_co": f"_128, _32, _128, _1, _1, {CO}, {PERSISTENT}, true",
    "s_64x64x128_pp": f"_64, _64, _128, _1, _1, {PP}, {PERSISTENT}, true",
    "s_128x64x64_sk": f"_128, _64, _64, _1, _1, {CO}, {SK}, true",
    "s_64x32x128_pp": f"_64, _32, _128, _1, _1, {PP}, {PERSISTENT}, true",
    "s_128x128x64_sk": f"_128, _128, _64, _1, _1, {CO}, {SK}, true",
    "s_256x128x64_co": f"_256, _128, _64, _1, _1, {CO}, {PERSISTENT}, true",
}


def cutlass_include(out: str) -> str:
    wheels = glob.glob(os.path.join(out, "nvidia_cutlass-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", out, "nvidia-cutlass"],
                       check=True)
        wheels = glob.glob(os.path.join(out, "nvidia_cutlass-*.whl"))
    root = os.path.join(out, "cutlass")
    if not os.path.isdir(root):
        zipfile.ZipFile(wheels[0]).extractall(root)
    return os.path.join(root, "cutlass_library", "source", "include")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    include = cutlass_include(a.out)

    def compile_one(name: str) -> str:
        src, obj = os.path.join(a.out, f"{name}.cu"), os.path.join(a.out, f"{name}.o")
        with open(src, "w") as f:
            f.write(f'#include "gemm.cuh"\nPROBE({name}, {CONFIGS[name]})\n')
        subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90a", "--expt-relaxed-constexpr", "-DNDEBUG",
                        f"-I{include}", f"-I{HERE}", "-Xcompiler", "-fPIC", "-c", src, "-o", obj], check=True)
        return obj
    with ThreadPoolExecutor(a.jobs) as pool:
        objects = list(pool.map(compile_one, CONFIGS))
    subprocess.run(["nvcc", "-shared", "-arch=sm_90a", "-o", os.path.join(a.out, "libprobe.so"), *objects], check=True)
    with open(os.path.join(a.out, "configs.txt"), "w") as f:
        f.write("\n".join(CONFIGS) + "\n")
    print(f"built {a.out}/libprobe.so: {len(CONFIGS)} configurations")


if __name__ == "__main__":
    main()
