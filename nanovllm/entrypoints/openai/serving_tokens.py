"""POST /tokenize, POST /detokenize and GET /v1/models."""
from __future__ import annotations

import asyncio

from nanovllm.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest, now
from nanovllm.entrypoints.openai.serving_chat import OpenAIServingChat
from nanovllm.text import check_text


class OpenAIServingTokens(OpenAIServingChat):
    def tokenize(self, request: TokenizeRequest) -> dict:
        self.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise ValueError("give exactly one of prompt (a string) or messages (a conversation)")
        if request.messages is not None:
            ids = self.prompt_ids(request.messages, request)
        else:
            check_text("prompt", request.prompt)
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    async def tokenize_async(self, request: TokenizeRequest) -> dict:
        """tokenize in a worker thread (a long prompt would stall every stream on the event loop)."""
        return await asyncio.to_thread(self.tokenize, request)

    def detokenize(self, request: DetokenizeRequest) -> dict:
        self.check_model(request.model)
        vocab_size = self.llm.config.hf_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"tokens has {bad[0]}, outside the vocabulary [0, {vocab_size})")
        return {"prompt": self.tokenizer.decode(request.tokens)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": now(),
                                            "owned_by": "nanovllm", "root": self.llm.config.model,
                                            "max_model_len": self.max_model_len}]}
