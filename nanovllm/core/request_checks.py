"""What SamplingParams cannot check alone, checked when a request is submitted (before any work is queued).

The params come validated (`SamplingParams.clone` or `validate`, just before: fields can be reassigned after
construction); checked here are the values the model
bounds: token ids inside the vocabulary, logprob counts and top_k at most its size; and the settings that need a
tokenizer: stop strings, streaming, bad words given as text, structured output.
"""
from nanovllm.sampling_params import SamplingParams


def check_request_params(params: SamplingParams, vocab_size: int, has_tokenizer: bool,
                         detokenize: bool = False) -> None:
    """ValueError naming the field, the value and what is allowed; `params` validated just before."""
    if (detokenize and params.detokenize or params.stop_strings) and not has_tokenizer:
        raise ValueError("stop strings and streaming need a tokenizer, and this engine has none "
                         "(skip_tokenizer_init=True): drop SamplingParams.stop, stream token ids only "
                         "(SamplingParams(detokenize=False)), or create the LLM with a tokenizer")
    for name in ("logprobs", "prompt_logprobs", "top_k"):
        value = getattr(params, name)
        if value is not None and value > vocab_size:
            raise ValueError(f"SamplingParams.{name}={value} is invalid: expected at most the vocabulary size "
                             f"{vocab_size}")
    token_lists = {"stop_token_ids": params.stop_token_ids, "allowed_token_ids": params.allowed_token_ids or [],
                   "logit_bias": list(params.logit_bias or {}),
                   "bad_words": [t for w in params.bad_words or [] if not isinstance(w, str) for t in w]}
    for name, ids in token_lists.items():
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.{name} has {bad[0]}, a token id outside the vocabulary [0, {vocab_size})")
    if not has_tokenizer and any(isinstance(w, str) for w in params.bad_words or []):
        raise ValueError("SamplingParams.bad_words holds text, and this engine has no tokenizer "
                         "(skip_tokenizer_init=True): give each bad word as a list of token ids")
    if params.structured is not None and not has_tokenizer:
        raise ValueError("structured output needs the tokenizer, and this engine has none (skip_tokenizer_init=True)")


def bad_word_token_ids(bad_words, tokenizer) -> list[list[int]]:
    """Each bad word as token ids: a list of ids as given; text encoded both as is and after a space (a word in
    the middle of a sentence is usually tokenized with its leading space), as vLLM does."""
    out: list[list[int]] = []
    for word in bad_words or []:
        variants = [word] if not isinstance(word, str) else [
            tokenizer.encode(text, add_special_tokens=False) for text in (word, " " + word.lstrip())]
        for ids in variants:
            if ids and ids not in out:
                out.append(list(ids))
    return out
