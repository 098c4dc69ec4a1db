"""Incremental detokenisation: correct across multi-byte characters, equal to a full decode, stop strings cut."""
import random

import pytest
from transformers import AutoTokenizer

from nanovllm.core.detokenizer import IncrementalDetokenizer, decode

TEXT = "unicode: café naïve 東京 🙂 hello world!"


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def byte_level_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2's byte-to-unicode map), so every multi-byte character is split."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return tokenizer.convert_tokens_to_ids([chars[b] for b in text.encode()])


def feed(detokenizer, token_ids) -> list[str]:
    return [detokenizer.add_token(t) for t in token_ids] + [detokenizer.flush()]


def test_multibyte_characters_split_over_tokens(tokenizer):
    ids = byte_level_ids(tokenizer, TEXT)
    assert len(ids) == len(TEXT.encode()) and decode(tokenizer, ids) == TEXT
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = feed(detokenizer, ids)
    assert "".join(pieces) == detokenizer.text == TEXT
    assert not any("\ufffd" in p for p in pieces), "a partial character was emitted"
    assert pieces.count("") == len(TEXT.encode()) - len(TEXT) + 1  # held back while partial, and the flush


def test_bpe_tokens_of_the_corpus(tokenizer):
    ids = tokenizer.encode(TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(feed(detokenizer, ids)) == TEXT


@pytest.mark.parametrize("seed", range(20))
def test_random_tokens_equal_a_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(feed(detokenizer, ids)) == detokenizer.text == decode(tokenizer, ids)


def stream_until_stop(tokenizer, token_ids, stop_strings):
    """Feed tokens, checking stop strings after each, as the scheduler does; returns (stop hit, streamed text, det)."""
    detokenizer = IncrementalDetokenizer(tokenizer, stop_strings)
    streamed, hit = "", None
    for t in token_ids:
        new_text = detokenizer.add_token(t)
        hit = detokenizer.find_stop_string(len(new_text))
        streamed += detokenizer.stream_text(finished=hit is not None)
        if hit:
            break
    return hit, streamed, detokenizer


def test_stop_string_across_multibyte_tokens_is_cut_and_held_back_from_the_stream(tokenizer):
    hit, streamed, detokenizer = stream_until_stop(tokenizer, byte_level_ids(tokenizer, "paris café🙂 is"),
                                                   ("zzz", "é🙂"))
    assert hit == "é🙂" and detokenizer.text == streamed == "paris caf"
    assert detokenizer.flush() == ""


def test_earliest_stop_string_wins(tokenizer):
    ids = byte_level_ids(tokenizer, "say hello world")  # the last byte completes both stop strings
    hit, streamed, detokenizer = stream_until_stop(tokenizer, ids, ("ld", "hello world"))
    assert hit == "hello world" and streamed == detokenizer.text == "say "


def test_no_stop_string_streams_everything(tokenizer):
    ids = tokenizer.encode(TEXT)
    hit, streamed, detokenizer = stream_until_stop(tokenizer, ids, ("absent",))
    assert hit is None and streamed + detokenizer.stream_text(finished=True) == TEXT
