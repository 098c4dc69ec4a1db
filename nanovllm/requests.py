"""The arguments of generate / stream, checked in full before anything is queued.

A bad prompt or parameter anywhere in a batch raises ValueError naming its index, so a call is accepted or
refused as a whole and the engine never holds part of a refused call.
"""
from numbers import Integral

from nanovllm.sampling_params import SamplingParams
from nanovllm.text import check_text


def is_token_id(t) -> bool:
    return isinstance(t, Integral) and not isinstance(t, bool)


def prompts_to_ids(prompts, tokenizer, vocab_size: int, max_model_len: int,
                   truncate: list[int | None] | None = None) -> list[list[int]]:
    """Strings or token-id lists (or one of either; vLLM's {"prompt": text} and {"prompt_token_ids": ids} too) ->
    token-id lists, each non-empty, inside the vocabulary and leaving room for at least one output token.
    `truncate`: per prompt, SamplingParams.truncate_prompt_tokens (keep the last k tokens), or None."""
    prompts = checked_prompt_list(prompts)
    truncate = truncate or [None] * len(prompts)
    return [prompt_to_ids(i, p, tokenizer, vocab_size, max_model_len, k) for i, (p, k) in enumerate(zip(prompts,
                                                                                                       truncate))]


def checked_prompt_list(prompts) -> list:
    """The prompts as a list (see as_prompt_list); ValueError for anything that is not one or a list of them."""
    prompts = as_prompt_list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a list of token ids, or a list of those (or of vLLM's prompt "
                         f"dicts); got {type(prompts).__name__}")
    return prompts


def unwrap_prompt_dict(i: int, prompt: dict):
    """vLLM's TextPrompt {"prompt": str} or TokensPrompt {"prompt_token_ids": [int, ...]} -> the text or the ids."""
    given = [key for key in ("prompt", "prompt_token_ids") if key in prompt]
    others = sorted(set(map(str, prompt)) - {"prompt", "prompt_token_ids"})
    if others:
        raise ValueError(f"prompts[{i}] has {', '.join(others)}: nanovllm takes {{'prompt': text}} or "
                         f"{{'prompt_token_ids': ids}} only (text models, no multi-modal data)")
    if len(given) != 1:
        raise ValueError(f"prompts[{i}] must hold one of prompt or prompt_token_ids; got "
                         f"{'both' if given else 'neither'}")
    value = prompt[given[0]]
    if given[0] == "prompt" and not isinstance(value, str):
        raise ValueError(f"prompts[{i}]['prompt'] must be a string; got {type(value).__name__}")
    if given[0] == "prompt_token_ids" and not isinstance(value, (list, tuple)):
        raise ValueError(f"prompts[{i}]['prompt_token_ids'] must be a list of int token ids; got "
                         f"{type(value).__name__}")
    return value


def as_prompt_list(prompts):
    """One prompt (a string, a token-id list or a vLLM prompt dict) as a list of one; a list of prompts as is."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and is_token_id(prompts[0])):
        return [prompts]
    return prompts


def prompt_texts(prompts) -> list[str | None]:
    """The text of each prompt as given (a string or vLLM's {"prompt": text}), None for token ids; call it after
    prompts_to_ids has accepted `prompts`."""
    texts = [p.get("prompt") if isinstance(p, dict) else p for p in as_prompt_list(prompts)]
    return [t if isinstance(t, str) else None for t in texts]


def prompt_to_ids(i: int, prompt, tokenizer, vocab_size: int, max_model_len: int,
                  truncate: int | None = None) -> list[int]:
    """One prompt's token ids (see prompts_to_ids); `truncate` keeps only its last that many tokens, before the
    length check (SamplingParams.truncate_prompt_tokens)."""
    if isinstance(prompt, dict):
        prompt = unwrap_prompt_dict(i, prompt)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompts[{i}] is text, but skip_tokenizer_init=True: pass token ids")
        check_text(f"prompts[{i}]", prompt)
        prompt = tokenizer.encode(prompt)
    elif not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompts[{i}] must be a string or a list of int token ids (or vLLM's {{'prompt': text}} /"
                         f" {{'prompt_token_ids': ids}}); got {type(prompt).__name__}")
    if truncate is not None and len(prompt) > truncate:
        prompt = prompt[len(prompt) - truncate:]
    # Fast path for plain ints (C-level passes; the per-token checks below cost ~0.1 s for the seed benchmark's
    # 143k prompt tokens, inside the timed call): same outcome, the slow path names the first bad token.
    if prompt and set(map(type, prompt)) == {int} and 0 <= min(prompt) and max(prompt) < vocab_size \
            and len(prompt) < max_model_len:
        return list(prompt)
    not_ids = [t for t in prompt if not is_token_id(t)]
    if not_ids:
        raise ValueError(f"prompts[{i}] holds {not_ids[0]!r} ({type(not_ids[0]).__name__}); token ids must be ints")
    if not prompt:
        raise ValueError(f"prompts[{i}] is empty; give at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
                         f"use ids the model's tokenizer produces")
    if len(prompt) >= max_model_len:
        raise ValueError(f"prompts[{i}] has {len(prompt)} tokens; with max_model_len={max_model_len} at most "
                         f"{max_model_len - 1} leave room for one output token: shorten it, raise max_model_len, "
                         f"or keep its end with SamplingParams(truncate_prompt_tokens=k)")
    return [int(t) for t in prompt]


def params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: None (the defaults), one for all, or a list as long as the prompts."""
    params = sampling_params if sampling_params is not None else SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if not isinstance(params, (list, tuple)) or any(not isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them; got "
                         f"{type(params).__name__}")
    if len(params) != num_prompts:
        raise ValueError(f"got {num_prompts} prompts but {len(params)} sampling params; give one, or one per prompt")
    return list(params)
