"""Every bad input raises a specific error naming the problem and the fix, before any work starts; a refused call
leaves the engine exactly as it was (the README's "Guarantees" table lists the same cases)."""
import json
import os
import shutil

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

MAX_MODEL_LEN = 64
NUM_BLOCKS = 32
SMALL = dict(backend="cpu_ref", num_kvcache_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, **SMALL)


BAD_REQUESTS = [
    ("empty text", [""], GREEDY, r"prompts\[0\] is empty; give at least one token"),
    ("empty ids", [[5], []], GREEDY, r"prompts\[1\] is empty"),
    ("too long", [[5] * MAX_MODEL_LEN], GREEDY, r"prompts\[0\] has 64 tokens; with max_model_len=64 at most 63"),
    ("too long in a batch", [[5], [6] * 100], GREEDY, r"prompts\[1\] has 100 tokens.*raise max_model_len"),
    ("id past the vocabulary", [[5, 512]], GREEDY, r"token id 512 outside the vocabulary \[0, 512\)"),
    ("negative id", [[5, -1]], GREEDY, r"token id -1 outside the vocabulary"),
    ("float id", [[5, 2.0]], GREEDY, r"prompts\[0\] holds 2.0 \(float\); token ids must be ints"),
    ("bool id", [[True]], GREEDY, r"holds True \(bool\)"),
    ("prompts of a wrong type", None, GREEDY, "prompts must be a string, a list of token ids"),
    ("a prompt of a wrong type", [[5], 7.5], GREEDY, r"prompts\[1\] must be a string or a list of int token ids"),
    ("params of a wrong type", [[5]], {"temperature": 0}, "sampling_params must be a SamplingParams or a list"),
    ("lists of different lengths", [[5], [6]], [GREEDY] * 3, "got 2 prompts but 3 sampling params"),
    ("logprobs past the vocabulary", [[5]], SamplingParams(logprobs=100000), "logprobs=100000 is invalid"),
    ("stop token past the vocabulary", [[5]], SamplingParams(stop_token_ids=[9999]), "stop_token_ids has 9999"),
    ("unpaired surrogate", ["fine", "bad \ud800 text"], GREEDY,
     r"prompts\[1\] is not valid Unicode text: '\\ud800' at character 4 is an unpaired surrogate"),
]


@pytest.mark.parametrize("prompts, params, message", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_before_any_work(llm, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params, use_tqdm=False)
    assert_idle(llm)


def assert_idle(llm):
    scheduler = llm.engine.scheduler
    assert not scheduler.waiting and not scheduler.running
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    scheduler.block_manager.check_invariants([])


def test_same_outputs_after_refused_calls(llm):
    prompts = random_prompts(6, 512, (1, 40), seed=21)
    before = llm.generate(prompts, GREEDY, use_tqdm=False)
    for _, bad_prompts, params, _ in BAD_REQUESTS:
        if isinstance(bad_prompts, list) and isinstance(params, SamplingParams):
            bad_prompts = prompts + bad_prompts  # good requests ahead of the bad one are refused with it
        with pytest.raises(ValueError):
            llm.generate(bad_prompts, params, use_tqdm=False)
        with pytest.raises(ValueError):
            llm.stream(bad_prompts, params)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == before
    assert_idle(llm)


def test_max_tokens_past_the_context_is_clamped(llm):
    out = llm.generate([[5] * (MAX_MODEL_LEN - 3)], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out["token_ids"]) == 3 and out["finish_reason"] == "length"


def test_stop_strings_without_a_tokenizer_queue_nothing(tiny_qwen3):
    llm = LLM(tiny_qwen3, skip_tokenizer_init=True, **SMALL)
    with pytest.raises(ValueError, match="stop strings and streaming need a tokenizer"):
        llm.generate([[5], [6]], [GREEDY, SamplingParams(stop="x")], use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings and streaming need a tokenizer"):
        llm.stream([[5]], GREEDY)
    with pytest.raises(ValueError, match="is text, but skip_tokenizer_init=True"):
        llm.generate(["hello"], GREEDY, use_tqdm=False)
    assert_idle(llm)
    ids_only = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, detokenize=False)
    pieces = list(llm.stream([[5]], ids_only))  # token ids stream without a tokenizer
    assert sum(len(p.token_ids) for p in pieces) == 3 and all(p.text == "" for p in pieces)


def test_closed_engine_refuses_work(tiny_qwen3):
    llm = LLM(tiny_qwen3, **SMALL)
    llm.close()
    with pytest.raises(RuntimeError, match=r"the engine is shut down \(close\(\) was called\); create a new LLM"):
        llm.generate([[5]], GREEDY, use_tqdm=False)


def broken_copy(src: str, dst, edit) -> str:
    path = shutil.copytree(src, os.path.join(str(dst), "model"))
    edit(path)
    return path


def rewrite_config(**changes):
    def edit(path):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        if "num_hidden_layers" in changes:
            config.pop("layer_types", None)  # transformers checks one against the other
        config.update(changes)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return edit


def remove(*names):
    return lambda path: [os.remove(os.path.join(path, n)) for n in names]


def write_config(text):
    def edit(path):
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(text)
    return edit


BAD_FOLDERS = [
    ("no config.json", remove("config.json"), FileNotFoundError, "has no config.json"),
    ("config.json not JSON", write_config("{not json"), ValueError, "cannot read .*config.json.*re-download"),
    ("unknown model_type", rewrite_config(model_type="bogus"), ValueError, "cannot read .*config.json"),
    ("unsupported architecture", rewrite_config(architectures=["GPT2LMHeadModel"]), ValueError,
     r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "),
    ("no tokenizer", remove("tokenizer.json", "tokenizer_config.json"), FileNotFoundError,
     "has no tokenizer .*skip_tokenizer_init=True"),
    ("no weights", remove("model.safetensors"), FileNotFoundError, r"no \*.safetensors weights"),
    ("hidden_size zero", rewrite_config(hidden_size=0), ValueError, r"config.json: hidden_size=0 is invalid"),
    ("heads negative", rewrite_config(num_attention_heads=-4), ValueError,
     r"config.json: num_attention_heads=-4 is invalid: expected an integer >= 1"),
    ("KV heads zero", rewrite_config(num_key_value_heads=0), ValueError, r"config.json: num_key_value_heads=0"),
    ("KV heads not dividing the heads", rewrite_config(num_key_value_heads=3), ValueError,
     r"num_key_value_heads=3 is invalid: expected a divisor of num_attention_heads=4"),
    ("max_position_embeddings zero", rewrite_config(max_position_embeddings=0), ValueError,
     r"config.json: max_position_embeddings=0 is invalid"),
    ("vocab_size below the embedding", rewrite_config(vocab_size=256), ValueError,
     r"config.json: vocab_size=256 is invalid: model.embed_tokens.weight has 512 rows"),
    ("a million layers", rewrite_config(num_hidden_layers=10**6), ValueError,
     r"config.json: num_hidden_layers=1000000 is invalid: the weights hold 2 layers"),
    ("rms_norm_eps negative", rewrite_config(rms_norm_eps=-1e-6), ValueError,
     r"config.json: rms_norm_eps=-1e-06 is invalid: expected a finite number >= 0"),
]


@pytest.mark.parametrize("edit, error, message", [c[1:] for c in BAD_FOLDERS], ids=[c[0] for c in BAD_FOLDERS])
def test_bad_model_folder(tiny_qwen3, tmp_path, edit, error, message):
    with pytest.raises(error, match=message):
        LLM(broken_copy(tiny_qwen3, tmp_path, edit), **SMALL)


def test_missing_folder_or_a_file(tiny_qwen3, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass the path of a Hugging Face checkpoint"):
        LLM(str(tmp_path / "nowhere"), **SMALL)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        LLM(os.path.join(tiny_qwen3, "config.json"), **SMALL)


BAD_OPTIONS = [
    ("unknown backend", dict(backend="cpu-ref"), ValueError, "unknown backend 'cpu-ref'.*did you mean 'cpu_ref'"),
    ("unknown option", dict(max_len=5), ValueError, "unknown engine option.*max_len"),
    ("a vLLM option nanovllm lacks", dict(swap_space=4), ValueError,
     "swap_space: preempted requests are recomputed, not swapped to the CPU; drop it"),
    ("prefix caching not a bool", dict(enable_prefix_caching="no"), ValueError,
     "enable_prefix_caching='no' is invalid: expected True or False"),
    ("block size not a power of two", dict(kvcache_block_size=24), ValueError,
     "kvcache_block_size=24 is invalid: expected a power of two"),
    ("block size zero", dict(kvcache_block_size=0), ValueError, "kvcache_block_size=0 is invalid"),
    ("tensor parallel size zero", dict(tensor_parallel_size=0), ValueError, "tensor_parallel_size=0 is invalid"),
    ("heads not divisible by TP", dict(tensor_parallel_size=3), ValueError,
     "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
    ("memory fraction zero", dict(cpu_memory_fraction=0), ValueError, r"cpu_memory_fraction=0 is invalid.*\(0, 1\]"),
    ("memory fraction above one", dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization=1.5"),
    ("KV budget below one sequence", dict(num_kvcache_blocks=3), ValueError,
     "budget of 3 blocks of 16 tokens cannot hold one sequence of max_model_len=64 .4 blocks needed.: raise"),
    ("max_model_len of a wrong type", dict(max_model_len="64"), ValueError, "max_model_len='64' is invalid"),
    ("unknown dtype", dict(dtype="float8"), ValueError, "dtype='float8' is invalid"),
    ("seed a string", dict(seed="x"), ValueError, r"seed='x' is invalid: expected an integer in \[0, 2\*\*64\)"),
    ("seed past 64 bits", dict(seed=2**70), ValueError, r"seed=1180591620717411303424 is invalid"),
    ("seed a float", dict(seed=1.5), ValueError, r"seed=1.5 is invalid"),
    ("skip_tokenizer_init a string", dict(skip_tokenizer_init="false"), ValueError,
     "skip_tokenizer_init='false' is invalid: expected True or False"),
    ("async_scheduling a number", dict(async_scheduling=0), ValueError, "async_scheduling=0 is invalid"),
    ("compile a string", dict(compile="yes"), ValueError, "compile='yes' is invalid"),
    ("tokenizer a number", dict(tokenizer=5), ValueError, "tokenizer=5 is invalid: expected a string"),
    ("device a number", dict(device=5), ValueError, "device=5 is invalid: expected a string"),
    ("device unknown", dict(device="gpu"), ValueError, "device='gpu' is invalid: expected a torch device name"),
    ("kernel name a number", dict(kernels={"attention.decode": 5}), ValueError,
     r"kernels\['attention.decode'\]=5 is invalid: expected a dict of op name -> kernel name"),
    ("kernels a number", dict(kernels=5), ValueError, "kernels=5 is invalid"),
    ("kernel_plan a number", dict(kernel_plan=5), ValueError, "kernel_plan=5 is invalid: expected the path"),
]


@pytest.mark.parametrize("options, error, message", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_engine_option(tiny_qwen3, options, error, message):
    with pytest.raises(error, match=message):
        LLM(tiny_qwen3, **{**SMALL, **options})


def test_kernel_plan_that_is_a_folder_or_binary(tiny_qwen3, tmp_path):
    with pytest.raises(ValueError, match=r"kernel plan '.*' is a folder; pass the plan's TOML file"):
        LLM(tiny_qwen3, kernel_plan=str(tmp_path), **SMALL)
    binary = tmp_path / "plan.toml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"kernel plan '.*plan.toml' is not valid TOML"):
        LLM(tiny_qwen3, kernel_plan=str(binary), **SMALL)


@pytest.mark.parametrize("budget", [12.5, 0, None, "32"])
def test_backend_kv_budget_that_is_not_a_block_count(tiny_qwen3, monkeypatch, budget):
    from nanovllm.backends.cpu_ref.plugin import CpuRefBackend
    monkeypatch.setattr(CpuRefBackend, "kv_cache_budget", lambda self, config, device, bytes_per_block: budget)
    with pytest.raises(RuntimeError, match=rf"backend 'cpu_ref': kv_cache_budget\(\) returned {budget!r}, not a "
                                           rf"number of KV blocks .*set num_kvcache_blocks=N"):
        LLM(tiny_qwen3, backend="cpu_ref", max_model_len=MAX_MODEL_LEN)


def test_chat_message_with_an_unpaired_surrogate(llm):
    with pytest.raises(ValueError, match=r"conversation 0, message 1 is not valid Unicode text"):
        llm.chat([{"role": "system", "content": "ok"}, {"role": "user", "content": "\udcff"}], GREEDY, use_tqdm=False)
    assert_idle(llm)
