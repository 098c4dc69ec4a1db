"""Beam search over the engine, as vLLM's `LLM.beam_search` does it: every step each live beam is one request of one
token whose top 2 x beam_width log-probabilities are the candidates; the prefix cache keeps each step's prefill to
the beams' last partial block.

A beam's score is its cumulative log-probability over len(tokens) ** length_penalty, with len(tokens) counting the
prompt and not a final EOS (vLLM's `get_beam_search_score`). Each step keeps the beam_width best candidates that
did not end with EOS; those that did are set aside as finished. After max_tokens steps (or when no beam is left, or
a beam reaches max_model_len) the finished ones and the live ones are ranked together and the best beam_width
returned, best first.
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from nanovllm.core.logging import get_logger
from nanovllm.sampling_params import BeamSearchParams, SamplingParams

logger = get_logger(__name__)


@dataclass
class BeamSearchSequence:
    """One beam (vLLM's fields): `tokens` the prompt's then the output's, `logprobs` one {token id: logprob} per
    output token (the candidates its step saw), `cum_logprob` the sum of the chosen tokens' log-probabilities,
    `text` the decoded `tokens` (the prompt's text included, as vLLM does; None without a tokenizer), and
    `finish_reason` "stop" (EOS) or "length"."""
    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    """One prompt's result: its best beams, best first."""
    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, eos_token_ids: set[int], length_penalty: float) -> float:
    length = len(beam.tokens) - (beam.tokens[-1] in eos_token_ids)
    return beam.cum_logprob / (length ** length_penalty)


def beam_search(llm, prompt_ids: list[list[int]], params: BeamSearchParams,
                use_tqdm: bool | Callable = False) -> list[BeamSearchOutput]:
    """`llm`: an LLM; `prompt_ids`: checked token-id lists. See the module docstring. `use_tqdm` shows a bar over
    the steps (True, or a tqdm-like class), while the project logger shows INFO."""
    eos = set() if params.ignore_eos else llm.engine.scheduler.eos_token_ids
    max_model_len = llm.config.max_model_len
    step_params = SamplingParams(temperature=params.temperature, max_tokens=1, ignore_eos=True,
                                 logprobs=2 * params.beam_width, detokenize=False)

    def key(beam):
        return beam_score(beam, eos, params.length_penalty)
    live = [[BeamSearchSequence(list(ids))] for ids in prompt_ids]
    finished: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
    make_bar = use_tqdm if callable(use_tqdm) else tqdm
    bar = make_bar(total=params.max_tokens, desc="Beam search", unit="step", dynamic_ncols=True,
                   disable=not (bool(use_tqdm) and logger.isEnabledFor(logging.INFO)))
    try:
        for _ in range(params.max_tokens):
            for i, beams in enumerate(live):  # no room for another token: done, as a sequence at max_model_len is
                for beam in [b for b in beams if len(b.tokens) >= max_model_len]:
                    beam.finish_reason = "length"
                    finished[i].append(beam)
                    beams.remove(beam)
            queued = [(i, beam) for i, beams in enumerate(live) for beam in beams]
            if not queued:
                break
            outputs = llm._generate([beam.tokens for _, beam in queued], [step_params] * len(queued), False,
                                    [None] * len(queued))
            candidates: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
            for (i, beam), out in zip(queued, outputs):
                step = out["outputs"][0]["logprobs"][0]
                for token, logprob in step.items():
                    candidates[i].append(BeamSearchSequence(beam.tokens + [token], beam.logprobs + [step],
                                                            beam.cum_logprob + logprob))
            for i, found in enumerate(candidates):
                kept = []
                for beam in sorted(found, key=key, reverse=True):
                    if beam.tokens[-1] in eos:  # every EOS candidate is a finished beam, ranked at the end
                        beam.finish_reason = "stop"
                        finished[i].append(beam)
                    elif len(kept) < params.beam_width:
                        kept.append(beam)
                live[i] = kept
            bar.update(1)
            bar.set_postfix_str(f"{sum(map(len, live))} live beams, {sum(map(len, finished))} finished",
                                refresh=False)
    finally:
        bar.close()
    results = []
    for i, beams in enumerate(live):
        for beam in beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(finished[i] + beams, key=key, reverse=True)[:params.beam_width]
        for beam in best:
            if beam.finish_reason == "stop" and not params.include_stop_str_in_output:
                beam.tokens = beam.tokens[:-1]  # scored with it (its length not counted), returned without
            if llm.tokenizer is not None:
                beam.text = llm.tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(best))
    return results
