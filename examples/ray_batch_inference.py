"""Batch inference over a Ray Dataset with a pool of nanovllm replicas (pip install 'nanovllm[ray]').

    python examples/ray_batch_inference.py                       # the embedded SmolLM2 on cpu_ref, 2 replicas
    python examples/ray_batch_inference.py --model PATH --backend cuda --replicas 8 --address auto

The same pipeline runs on a laptop's local Ray and on a cluster (--address): only the config changes.
"""
import argparse

import ray

from nanovllm.ray import ProcessorConfig, build_processor

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Who wrote Hamlet?", "What does a CPU do?", "Translate 'thank you' into French."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a checkpoint folder readable on every node (default: embedded SmolLM2)")
    parser.add_argument("--backend", default="cpu_ref")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--address", help="a Ray cluster to join, e.g. auto (default: start a local Ray)")
    args = parser.parse_args()
    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    if args.model is None:  # convert the embedded model once here, not in every replica
        from nanovllm.checkpoint.default_model import default_model_path
        args.model = default_model_path()

    config = ProcessorConfig(
        model=args.model, backend=args.backend,
        engine_options={"max_model_len": 512, "num_kvcache_blocks": 256} if args.backend == "cpu_ref" else {},
        sampling_params={"temperature": 0.0, "max_tokens": 32},
        concurrency=args.replicas,  # engine replicas: one LLM per Ray actor, built once
        batch_size=2)               # rows per LLM.generate call on a replica
    processor = build_processor(
        config,
        # each input row -> what a replica reads: messages (chat), prompt or prompt_token_ids, sampling fields
        preprocess=lambda row: {"question": row["question"],
                                "messages": [{"role": "user", "content": row["question"]}],
                                "max_tokens": 24 if "?" in row["question"] else 16},
        # each output row -> what to keep
        postprocess=lambda row: {"question": row["question"], "answer": row["generated_text"],
                                 "tokens": row["num_generated_tokens"], "error": row["error"]})

    questions = ray.data.from_items([{"id": i, "question": q} for i, q in enumerate(QUESTIONS)])
    for row in processor(questions).take_all():
        print(f"Q: {row['question']}\nA: {row['answer'] if row['error'] is None else 'error: ' + row['error']}\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
