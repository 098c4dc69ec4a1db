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


def request_output(seq: Sequence, tokenizer) -> dict:
    """{text, token_ids, prompt_token_ids, finish_reason, logprobs}; logprobs is None unless the request asked,
    else one {token id: logprob} per output token (the top N, then the sampled token)."""
    return {"text": output_text(seq, tokenizer), "token_ids": seq.output_token_ids,
            "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens], "finish_reason": seq.finish_reason,
            "logprobs": seq.logprobs if seq.params.logprobs is not None else None}
