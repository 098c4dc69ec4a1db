"""Beam search over the engine, as vLLM's `LLM.beam_search` does it: every step each live beam is one request of one
token whose top 2 x beam_width log-probabilities are the candidates; the prefix cache keeps each step's prefill to
the beams' last partial block.

A beam's score is its cumulative log-probability over len(tokens) ** length_penalty, with len(tokens) counting the
prompt and not a final EOS (vLLM's `get_beam_search_score`). Each step keeps the beam_width best candidates that
did not end with EOS; those that did are set aside as finished. After max_tokens steps (or when no beam is left, or
a beam reaches max_model_len) the finished ones and the live ones are ranked together and the best beam_width
returned, best first.

`BeamSearch` holds the search's state; `LLM.beam_search` (`beam_search` below) and `AsyncLLM.beam_search` drive it
with the engine, one step of one-token requests at a time.
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
    `text` the decoded `tokens` (the prompt's text included, as vLLM's LLM.beam_search does; None without a
    tokenizer), and `finish_reason` "stop" (EOS) or "length"."""
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


class BeamSearch:
    """The state of one search over several prompts. A driver asks for `queries()` (the live beams' token ids: one
    one-token request each, with `step_params`), runs them, hands each request's logprob dict to `advance`, and
    repeats until `queries()` is empty; then `results()`."""

    def __init__(self, prompt_ids: list[list[int]], params: BeamSearchParams, eos_token_ids: set[int],
                 max_model_len: int):
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam_search takes a BeamSearchParams(beam_width=..., max_tokens=...); got "
                             f"{type(params).__name__}")
        self.params, self.max_model_len = params, max_model_len
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.step_params = SamplingParams(temperature=params.temperature, max_tokens=1, ignore_eos=True,
                                          logprobs=2 * params.beam_width, detokenize=False)
        self.live = [[BeamSearchSequence(list(ids))] for ids in prompt_ids]
        self.finished: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
        self.steps_done = 0
        self._queued: list[tuple[int, BeamSearchSequence]] = []

    def _key(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos, self.params.length_penalty)

    def queries(self) -> list[list[int]]:
        """The token ids of this step's one-token requests, or [] when the search is over."""
        if self.steps_done >= self.params.max_tokens:
            return []
        for i, beams in enumerate(self.live):  # no room for another token: done, as a sequence at max_model_len is
            for beam in [b for b in beams if len(b.tokens) >= self.max_model_len]:
                beam.finish_reason = "length"
                self.finished[i].append(beam)
                beams.remove(beam)
        self._queued = [(i, beam) for i, beams in enumerate(self.live) for beam in beams]
        return [beam.tokens for _, beam in self._queued]

    def advance(self, steps: list[dict[int, float]]) -> None:
        """Each query's {token id: logprob} (its top 2 x beam_width, and the sampled token): the next beams."""
        candidates: list[list[BeamSearchSequence]] = [[] for _ in self.live]
        for (i, beam), step in zip(self._queued, steps, strict=True):
            for token, logprob in step.items():
                candidates[i].append(BeamSearchSequence(beam.tokens + [token], beam.logprobs + [step],
                                                        beam.cum_logprob + logprob))
        for i, found in enumerate(candidates):
            kept = []
            for beam in sorted(found, key=self._key, reverse=True):
                if beam.tokens[-1] in self.eos:  # every EOS candidate is a finished beam, ranked at the end
                    beam.finish_reason = "stop"
                    self.finished[i].append(beam)
                elif len(kept) < self.params.beam_width:
                    kept.append(beam)
            self.live[i] = kept
        self.steps_done += 1

    def progress(self) -> str:
        return f"{sum(map(len, self.live))} live beams, {sum(map(len, self.finished))} finished"

    def results(self, decode: Callable[[list[int]], str] | None) -> list[BeamSearchOutput]:
        """Per prompt its best beam_width beams, best first; `decode` fills their `text` (None: left None)."""
        results = []
        for i, beams in enumerate(self.live):
            for beam in beams:
                beam.finish_reason = beam.finish_reason or "length"
            best = sorted(self.finished[i] + beams, key=self._key, reverse=True)[:self.params.beam_width]
            for beam in best:
                if beam.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                    beam.tokens = beam.tokens[:-1]  # scored with it (its length not counted), returned without
                if decode is not None:
                    beam.text = decode(beam.tokens)
            results.append(BeamSearchOutput(best))
        return results


def beam_search(llm, prompt_ids: list[list[int]], params: BeamSearchParams,
                use_tqdm: bool | Callable = False) -> list[BeamSearchOutput]:
    """LLM.beam_search's driver. `llm`: an LLM; `prompt_ids`: checked token-id lists. `use_tqdm` shows a bar over
    the steps (True, or a tqdm-like class), while the project logger shows INFO."""
    search = BeamSearch(prompt_ids, params, llm.engine.scheduler.eos_token_ids, llm.config.max_model_len)
    make_bar = use_tqdm if callable(use_tqdm) else tqdm
    bar = make_bar(total=params.max_tokens, desc="Beam search", unit="step", dynamic_ncols=True,
                   disable=not (bool(use_tqdm) and logger.isEnabledFor(logging.INFO)))
    try:
        while queries := search.queries():
            outputs = llm._generate(queries, [search.step_params] * len(queries), False, [None] * len(queries))
            search.advance([out["outputs"][0]["logprobs"][0] for out in outputs])
            bar.update(1)
            bar.set_postfix_str(search.progress(), refresh=False)
    finally:
        bar.close()
    return search.results(llm.tokenizer.decode if llm.tokenizer is not None else None)
