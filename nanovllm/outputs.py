"""What LLM returns: one dict per request from `generate`/`chat`, and StreamOutput pieces from `stream`."""
from dataclasses import dataclass

from nanovllm.core.detokenizer import decode
from nanovllm.core.sequence import Sequence


@dataclass
class StreamOutput:
    """What one engine step added to request `index`: the new text, the new token ids (and their logprobs when
    asked). `finished` is True on the request's last piece, which also carries its finish_reason."""
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    request_id: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on a request's first piece, when asked for
    first_token_time: float | None = None  # AsyncLLM: time.monotonic() at the first token (on the last piece)
    sample_index: int = 0  # which of the request's n samples (SamplingParams.n) this piece belongs to


def output_text(seq: Sequence, tokenizer) -> str:
    """The output's text: without a stop string and what follows, and without a stop token's text."""
    if seq.detokenizer is not None:
        return seq.detokenizer.text
    if tokenizer is None:  # skip_tokenizer_init: token ids only
        return ""
    ids = seq.output_token_ids
    if isinstance(seq.stop_reason, int):
        ids = ids[:-1]
    return decode(tokenizer, ids)


def completion_output(seq: Sequence, tokenizer) -> dict:
    """One sample: {index, text, token_ids, finish_reason, logprobs, cumulative_logprob}. logprobs is None unless
    the request asked, else one {token id: logprob} per output token (the top N, then the sampled token), and
    cumulative_logprob is then the sum of the sampled tokens' log-probabilities (None otherwise)."""
    asked = seq.params.logprobs is not None
    cumulative = sum(step[t] for t, step in zip(seq.output_token_ids, seq.logprobs)) if asked else None
    return {"index": seq.sample_index, "text": output_text(seq, tokenizer), "token_ids": seq.output_token_ids,
            "finish_reason": seq.finish_reason, "logprobs": seq.logprobs if asked else None,
            "cumulative_logprob": cumulative}


def request_output(seq: Sequence, tokenizer) -> dict:
    """One request (`seq` is its first sample): {prompt_token_ids, prompt_logprobs, outputs} where `outputs` lists
    its n samples (see completion_output), plus the first sample's text, token_ids, finish_reason, logprobs and
    cumulative_logprob as flat keys (the shape before n existed). prompt_logprobs is None unless asked, else one
    entry per prompt token: None for the first, then {token id: logprob} (the top N, then the prompt token)."""
    outputs = [completion_output(sample, tokenizer) for sample in seq.group]
    flat = {k: v for k, v in outputs[0].items() if k != "index"}
    return {**flat, "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens],
            "prompt_logprobs": seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            "outputs": outputs}
