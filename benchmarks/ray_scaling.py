"""Data-parallel scaling of nanovllm.ray on this machine: N cpu_ref replicas vs one, on the same rows.

    python benchmarks/ray_scaling.py [--rows 1024] [--max-tokens 64] [--replicas 1 2] [--model PATH]

Without --model, a tiny random Qwen3 (nanovllm.testing.tiny_models) is built in a temporary folder. Every run
generates the same rows (greedy, ignore_eos, so every row makes exactly --max-tokens tokens). Rows: plain
LLM.generate in this process (torch threads 1 and all cores), then one Ray job per replica count on a local Ray
(each replica reserves one CPU, so Ray gives it one torch thread). A Ray job's time includes starting its
replicas (new processes that import torch and build the LLM); the last column leaves that out: tokens/s from
the first batch's arrival to the end.
"""
import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the machine may be shared
# Ray starts its workers at nice 15 by default; on a machine shared with other work that alone starves the
# replicas against this process's in-process runs (nice 0), so both run at the same priority here.
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402

ENGINE = dict(num_kvcache_blocks=512, max_model_len=256)


def make_rows(n: int, max_tokens: int) -> list[dict]:
    return [{"id": i, "prompt_token_ids": [3 + (i * 31 + j * 7) % 500 for j in range(16 + i % 48)],
             "max_tokens": max_tokens} for i in range(n)]


def plain(model: str, rows: list[dict], threads: int) -> float:
    from nanovllm import LLM, SamplingParams
    torch.set_num_threads(threads)
    llm = LLM(model, backend="cpu_ref", **ENGINE)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in rows]
    llm.generate([r["prompt_token_ids"] for r in rows[:8]], params[:8], use_tqdm=False)
    start = time.perf_counter()
    llm.generate([r["prompt_token_ids"] for r in rows], params, use_tqdm=False)
    return time.perf_counter() - start


def on_ray(model: str, rows: list[dict], replicas: int, batch_size: int) -> tuple[float, float]:
    """(seconds of the whole job, generated tokens/s after its first batch came out: replicas started)."""
    import ray

    from nanovllm.ray import ProcessorConfig, build_processor
    config = ProcessorConfig(model=model, backend="cpu_ref", engine_options=ENGINE, concurrency=replicas,
                             batch_size=batch_size, num_cpus=1,
                             sampling_params={"temperature": 0.0, "ignore_eos": True})
    start = time.perf_counter()
    dataset = build_processor(config)(ray.data.from_items(rows))
    first = None
    tokens = tokens_after_first = 0
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        num_tokens = sum(batch.column("num_generated_tokens").to_pylist())
        tokens += num_tokens
        if first is None:
            first = time.perf_counter()
        else:
            tokens_after_first += num_tokens
    end = time.perf_counter()
    if tokens != sum(r["max_tokens"] for r in rows):
        raise RuntimeError("a row came back short: the benchmark's rows must all run to max_tokens")
    return end - start, tokens_after_first / max(end - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model")
    args = parser.parse_args()
    import ray
    model = args.model
    if model is None:
        from nanovllm.testing.tiny_models import make_tiny_model
        model = make_tiny_model(os.path.join(tempfile.mkdtemp(), "qwen3"), "qwen3")
    rows = make_rows(args.rows, args.max_tokens)
    tokens = sum(r["max_tokens"] for r in rows)
    cores = os.cpu_count()
    print(f"# {platform.node()}: {cores} cores, load average {os.getloadavg()[0]:.1f} at start, Ray worker "
          f"niceness {os.environ['RAY_worker_niceness']}; torch "
          f"{torch.__version__}, ray {ray.__version__}; {args.rows} rows x {args.max_tokens} tokens = {tokens} tokens")
    results = [(f"LLM.generate in-process, {t} torch thread(s)", plain(model, rows, t), None)
               for t in sorted({1, cores})]
    ray.init(address="local", num_cpus=max(args.replicas), include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for n in args.replicas:
        batch_size = -(-len(rows) // (8 * n))  # eight batches per replica
        seconds, steady = on_ray(model, rows, n, batch_size)
        results.append((f"Ray Data, {n} replica(s) of 1 CPU, batch_size {batch_size}", seconds, steady))
    ray.shutdown()
    print(f"# load average {os.getloadavg()[0]:.1f} at end")
    print("| run | s | tokens/s | tokens/s after the first batch (replicas started) |")
    print("|---|---|---|---|")
    for name, seconds, steady in results:
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:,.0f} | {'' if steady is None else f'{steady:,.0f}'} |")


if __name__ == "__main__":
    main()
