"""IncrementalDetokenizer: a sequence's output text, one token at a time, and its stop strings.

Byte-level BPE can split one character over several tokens, and a token decoded alone then yields U+FFFD.
So we decode a short window of tokens starting at the last emitted chunk and only emit text once it no
longer ends in a partial character (the method of vLLM and text-generation-inference): each token costs
two decodes of a few tokens, not a decode of the whole output. The final text equals
`tokenizer.decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` (less a stop
string and what follows it; SamplingParams.skip_special_tokens and include_stop_str_in_output change both).
"""

REPLACEMENT_CHAR = "\ufffd"


def decode(tokenizer, token_ids: list[int], skip_special_tokens: bool = True) -> str:
    """The decoding every output text uses, streamed or not."""
    return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop_str: bool = False):
        """`include_stop_str`: the text keeps a stop string that ends it (cut after it, not before)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens, self.include_stop_str = skip_special_tokens, include_stop_str
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # window start: the tokens of the last emitted chunk
        self.read_offset = 0  # tokens before this are in `text`
        self.text = ""
        self.stop_strings = stop_strings
        # a stop string may end in text not produced yet, so a stream holds back this many chars
        self.stop_buffer_len = max((len(s) for s in stop_strings), default=1) - 1
        self.num_streamed_chars = 0
        self.stopped = False  # the text was cut at a stop string: nothing more is added

    def add_token(self, token_id: int) -> str:
        """Append one token; returns the text it completed ("" while a character is still partial)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset:])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(window[len(prefix):])

    def flush(self) -> str:
        """At the end of the sequence: add what a partial character left pending (as U+FFFD, like decode does)."""
        if self.stopped or self.read_offset == len(self.token_ids):
            return ""
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset:])
        return self._emit(window[len(prefix):])

    def _decode(self, token_ids: list[int]) -> str:
        return decode(self.tokenizer, token_ids, self.skip_special_tokens)

    def _emit(self, new_text: str) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += new_text
        return new_text

    def find_stop_string(self, num_new_chars: int) -> str | None:
        """Look for a stop string ending in the last `num_new_chars` chars; on a hit, cut the text where it starts
        (where it ends with include_stop_str).

        Only the tail is searched (the new chars and the stop_buffer_len before them), so the cost does not grow
        with the output. The earliest match wins.
        """
        if not num_new_chars or self.stopped:
            return None
        start = max(0, len(self.text) - num_new_chars - self.stop_buffer_len)
        hit, hit_at = None, len(self.text)
        for stop in self.stop_strings:
            i = self.text.find(stop, start)
            if i != -1 and i < hit_at:
                hit, hit_at = stop, i
        if hit is not None:
            self.text = self.text[:hit_at + (len(hit) if self.include_stop_str else 0)]
            self.stopped = True
        return hit

    def stream_text(self, finished: bool) -> str:
        """The text not streamed yet, less the last stop_buffer_len chars until the sequence finishes."""
        end = len(self.text) if finished else max(self.num_streamed_chars, len(self.text) - self.stop_buffer_len)
        new_text = self.text[self.num_streamed_chars:end]
        self.num_streamed_chars = end
        return new_text
