"""LLM: the user-facing offline API, shaped like vLLM's (`generate`)."""
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
    """An offline engine over one model: `LLM(model_path, backend=None, **engine_options)`."""

    def __init__(self, model: str, backend: str | None = None, **options):
        unknown = sorted(set(options) - set(EngineConfig.option_names()))
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(EngineConfig.option_names())}")
        model = os.path.expanduser(str(model))
        check_model_folder(model)
        hf_config = AutoConfig.from_pretrained(model)
        self.config = EngineConfig(model=model, backend=backend, hf_config=hf_config, **options)
        self.tokenizer = None if self.config.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            self.config.tokenizer or model)
        self.engine = Engine(self.config)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (if any); also run at exit and by `with LLM(...)`."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _prompts_to_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
        vocab = self.config.hf_config.vocab_size
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompts[{i}] is text, but skip_tokenizer_init=True: pass token ids")
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

    def _output(self, seq) -> dict:
        tokens = seq.output_token_ids
        text = "" if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)
        return {"text": text, "token_ids": tokens,
                "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens], "finish_reason": seq.finish_reason}
