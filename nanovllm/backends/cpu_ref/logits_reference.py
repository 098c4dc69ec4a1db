"""The plain reference of `core/sampling/logits_processing.py`: one request's logits, token by token, in Python.

Slow on purpose: it states the formulas the batched device code must equal (see that module's docstring).
"""
import math


def process_logits_reference(logits: list[float], params, prompt_ids: list[int], output_ids: list[int],
                             bad_word_ids: list[list[int]]) -> list[float]:
    """One row of logits after logit_bias, allowed_token_ids, bad words and the three penalties."""
    out = list(logits)
    for token, bias in (params.logit_bias or {}).items():
        out[token] += bias
    if params.allowed_token_ids is not None:
        allowed = set(params.allowed_token_ids)
        out = [x if t in allowed else -math.inf for t, x in enumerate(out)]
    for word in bad_word_ids:
        before = word[:-1]
        if not before or output_ids[len(output_ids) - len(before):] == before and len(output_ids) >= len(before):
            out[word[-1]] = -math.inf
    counts: dict[int, int] = {}
    for t in output_ids:
        counts[t] = counts.get(t, 0) + 1
    seen = set(prompt_ids) | set(output_ids)
    r = params.repetition_penalty
    for t in range(len(out)):
        if t in seen and r != 1:
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
        if t in counts:
            out[t] -= params.frequency_penalty * counts[t] + params.presence_penalty
    return out
