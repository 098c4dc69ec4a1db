"""Checks on text from users (prompts, messages, stop strings, bad words, constraints) before a tokenizer or a
grammar compiler sees it."""


def check_text(where: str, text: str) -> None:
    """ValueError when `text` cannot be encoded as UTF-8 (an unpaired surrogate, e.g. from a bad JSON escape or
    a file read with errors="surrogateescape"): the tokenizer would fail with a TypeError naming nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode text: {text[e.start:e.end]!r} at character {e.start} is an "
                         f"unpaired surrogate; fix the text (e.g. decode its bytes with errors='replace')") from None
