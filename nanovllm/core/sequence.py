"""Sequence: one request's tokens, its place in the paged KV cache, and how far it has got."""
from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


PENDING_TOKEN = -1  # a sampled token still on the device (the step that makes it is in flight)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt then output), the KV block table and the count of tokens whose KV is cached.

    `num_computed_tokens` counts tokens whose K/V are in the cache (prefix-cache hits included); a step
    computes `token_ids[num_computed_tokens : num_computed_tokens + n]` and a token is sampled once every
    token is computed.
    """
    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # of the prompt, served by the prefix cache at the last admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        self.block_keys: list[int] = []  # prefix-cache keys of its leading full, known blocks (BlockManager.block_key)
        self.num_pending = 0  # trailing PENDING_TOKEN placeholders
        self.params = params
        self.finish_reason: str | None = None  # "stop" or "length" (or "abort")
        self.stop_reason: int | str | None = None  # the stop token id or stop string that finished it
        self.stopped_by_eos = False  # that token was EOS (not ignored): vLLM reports no stop_reason then
        self.stop_token_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and params.stop_token_ids
        self.generator = None  # torch.Generator of a seeded request
        self.detokenizer = None  # IncrementalDetokenizer, for streamed requests and requests with stop strings
        self.logprobs: list[dict[int, float]] = []  # one per output token, when params.logprobs is set
        self.num_preemptions = 0
        self.bad_word_ids: list[list[int]] = []  # params.bad_words as token ids (tokenized at submission)
        self.prompt_logprobs: list[dict[int, float] | None] = []  # when params.prompt_logprobs is set: one per prompt
        self.structured = None  # StructuredState of a request with params.structured
        self.group: list["Sequence"] = [self]  # the n samples of its request (params.n), this one included
        self.sample_index = 0  # its place in `group`
        self.deferred_samples: list["Sequence"] = []  # the request's other samples, queued once this one's prompt
        # is computed and in the prefix cache, so that they share its KV blocks instead of computing them again

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
