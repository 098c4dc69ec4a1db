"""Decode graphs with and without the L2 weight prefetch (backends/cuda/l2_prefetch.py), GPU only.

For each batch size: that many sequences of --context/2 to --context prompt tokens, decoding; one decode step
is prepared in the graphs' static record, then graphs of that size without the prefetch, with a plain prefetch and
with an evict_last prefetch replay it in turn (--rounds x --replays, CUDA events). Prints us a step for each, the
ratios to the first, and how close their logits are to the first's.

    python benchmarks/graph_variants.py --config ../shared/models/qwen3-0.6b/config.json [--kv-cache-dtype fp8]
"""
import argparse
import json
import os

import torch

from nanovllm import LLM, SamplingParams


def replay_us(graph, replays: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batches", default="256,192,128,96,64,32")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--json", help="write the rows here (a list of {batch, variant: us})")
    args = p.parse_args()
    from nanovllm.backends.cuda.graphs import CudaGraphRunner
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend="cuda", load_format="dummy",
              skip_tokenizer_init=True, max_model_len=4096, max_num_seqs=max(batches),
              kv_cache_dtype=args.kv_cache_dtype)
    engine, runner, sched = llm.engine, llm.engine.runner, llm.engine.scheduler
    g = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, KV {args.kv_cache_dtype}, contexts {args.context // 2}-{args.context}")
    rows = []
    names = {"off": False, "normal": "normal", "evict_last": True}
    print("batch | " + " | ".join(f"{n} us" for n in names) + " | ratios to off | max |logit diff| | argmax agree")
    for bs in batches:
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=100_000)
        seqs = [engine.add_request(torch.randint(0, 10000, (int(n),), generator=g).tolist(), params)
                for n in torch.randint(args.context // 2, args.context + 1, (bs,), generator=g)]
        while sched.waiting or any(s.num_output_tokens == 0 for s in seqs):
            engine.step()
        torch.cuda.synchronize()
        sizes = sorted({bs, max(batches)})  # the largest: the graphs' record is the step builder's, sized for it
        variants = {name: CudaGraphRunner(runner, sizes, value) for name, value in names.items()}
        batch = sched.schedule()
        assert len(batch.seqs) == bs and not batch.is_prefill
        ids, pos, meta, _ = runner.prepare(batch)
        assert ids.data_ptr() == variants["off"].input_ids.data_ptr(), "the step was not built in the graphs' record"
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, v in variants.items():
                times[name].append(replay_us(v.graphs[bs, 0], args.replays))
        best = {name: min(t) for name, t in times.items()}
        logits = {name: v.logits[bs, 0].float() for name, v in variants.items()}
        diff = max((logits[n] - logits["off"]).abs().max().item() for n in names)
        agree = min((logits[n].argmax(-1) == logits["off"].argmax(-1)).float().mean().item() for n in names)
        print(f"{bs} | " + " | ".join(f"{best[n]:.1f}" for n in names) + " | "
              + " ".join(f"{best[n] / best['off']:.3f}" for n in names) + f" | {diff:.3g} | {agree:.3f}", flush=True)
        rows.append({"batch": bs, **best})
        sched.postprocess(batch, [0] * bs)
        runner.inputs.pad_sizes = runner.graphs.batch_sizes  # the engine's own graphs again
        del variants
        engine.abort(seqs)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
