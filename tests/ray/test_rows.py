"""Rows, config and the in-process `nanovllm batch`: everything of nanovllm.ray that needs no Ray cluster."""
import builtins
import json
import sys

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main
from nanovllm.ray import ProcessorConfig, build_processor, generate_rows
from nanovllm.ray.rows import row_sampling_params

ENGINE = dict(backend="cpu_ref", num_kvcache_blocks=128, max_model_len=128)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, **ENGINE)


def test_rows_match_generate_and_refused_rows_get_an_error(llm):
    chat = [{"role": "user", "content": "paris is"}]
    rows = [{"prompt": "the quick", "max_tokens": 6, "tag": "a"},
            {"prompt": ""},
            {"messages": chat, "temperature": 0.7, "seed": 3, "max_tokens": 5},
            {"prompt_token_ids": [5] * 200},
            {"prompt_token_ids": [7, 8, 9], "sampling_params": {"max_tokens": 4, "ignore_eos": True}},
            {"prompt": "hello", "top_p": 2.0},
            {"prompt": "a", "prompt_token_ids": [4]},
            {"prompt_token_ids": [600]},
            {"prompt": 5}]
    out = generate_rows(llm, rows, {"temperature": 0.0, "max_tokens": 8})
    expected = llm.generate(["the quick", llm.chat_prompt(chat), [7, 8, 9]],
                            [SamplingParams(temperature=0, max_tokens=6),
                             SamplingParams(temperature=0.7, seed=3, max_tokens=5),
                             SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)], use_tqdm=False)
    for row, e in zip([out[0], out[2], out[4]], expected):
        assert (row["generated_text"], row["token_ids"], row["finish_reason"], row["num_prompt_tokens"],
                row["num_generated_tokens"], row["error"]) == \
               (e["text"], e["token_ids"], e["finish_reason"], len(e["prompt_token_ids"]), len(e["token_ids"]), None)
    assert out[0]["tag"] == "a" and out[4]["sampling_params"] == {"max_tokens": 4, "ignore_eos": True}
    errors = {i: out[i]["error"] for i in (1, 3, 5, 6, 7, 8)}
    assert "the prompt is empty" in errors[1]
    assert "the prompt has 200 tokens" in errors[3] and "max_model_len=128" in errors[3]
    assert "SamplingParams.top_p=2.0" in errors[5]
    assert "exactly one of prompt, messages, prompt_token_ids; this one has prompt, prompt_token_ids" in errors[6]
    assert "outside the vocabulary" in errors[7]
    assert "prompt must be text" in errors[8]
    for i in errors:
        assert (out[i]["token_ids"], out[i]["num_generated_tokens"], out[i]["generated_text"]) == ([], 0, None)
    assert llm.engine.scheduler.block_manager.num_free_blocks == 128  # refused calls left nothing behind


def test_row_sampling_fields_override_defaults_and_unknown_fields_are_refused():
    params = row_sampling_params({"sampling_params": {"temperature": 0.5, "top_k": 4}, "top_k": 2, "seed": None},
                                 {"temperature": 0.0, "max_tokens": 9})
    assert (params.temperature, params.top_k, params.max_tokens, params.seed) == (0.5, 2, 9, None)
    with pytest.raises(ValueError, match="unknown sampling field.*max_len"):
        row_sampling_params({"sampling_params": {"max_len": 3}}, {})


def test_config_checks_values_and_reserves_per_replica():
    with pytest.raises(ValueError, match=r"ProcessorConfig.concurrency=0 is invalid"):
        ProcessorConfig(concurrency=0)
    with pytest.raises(ValueError, match="max_restarts=-2"):
        ProcessorConfig(max_restarts=-2)
    with pytest.raises(ValueError, match="unknown field.*temp"):
        ProcessorConfig(sampling_params={"temp": 0})
    tp2 = {"tensor_parallel_size": 2}
    assert ProcessorConfig(backend="cuda", engine_options=tp2).replica_resources() == {"num_cpus": 1, "num_gpus": 2}
    assert ProcessorConfig(backend=None, engine_options=tp2).replica_resources(8) == {"num_cpus": 1, "num_gpus": 2}
    assert ProcessorConfig(backend="cpu_ref", engine_options=tp2).replica_resources(8) == {"num_cpus": 2,
                                                                                          "num_gpus": 0}
    assert ProcessorConfig(num_cpus=3).replica_resources() == {"num_cpus": 3, "num_gpus": 0}


def test_missing_ray_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(RuntimeError, match=r"pip install 'nanovllm\[ray\]'"):
        build_processor(ProcessorConfig())


def test_cli_batch_in_process_round_trips_jsonl(tiny_qwen3, tmp_path, capsys):
    rows = [{"id": 0, "prompt": "the quick"}, {"id": 1, "messages": [{"role": "user", "content": "hi"}]},
            {"id": 2, "prompt_token_ids": [5, 6], "max_tokens": 3}, {"id": 3, "prompt": ""}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["batch", str(src), str(dst), "--model", tiny_qwen3, "--backend", "cpu_ref", "--max-tokens", "5",
                 "--num-kvcache-blocks", "64", "--max-model-len", "128", "--batch-size", "2"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [{k: o[k] for k in r} for o, r in zip(out, rows)] == rows
    assert [o["num_generated_tokens"] for o in out] == [5, 5, 3, 0]
    assert out[3]["error"] and all(o["error"] is None for o in out[:3])
    assert "4 rows written" in capsys.readouterr().err
    src.write_text("{not json}\n")
    assert main(["batch", str(src), str(dst), "--model", tiny_qwen3]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err


def test_replica_runs_preprocess_and_postprocess_around_a_batch(tiny_qwen3, llm):
    import pyarrow as pa

    from nanovllm.ray.replica import LLMReplica
    options = {k: v for k, v in ENGINE.items() if k != "backend"}
    replica = LLMReplica(tiny_qwen3, "cpu_ref", options, {"temperature": 0.0, "max_tokens": 4},
                         preprocess=lambda row: {"q": row["q"], "prompt": row["q"] * 2},
                         postprocess=lambda row: {"q": row["q"], "answer": row["generated_text"],
                                                  "error": row["error"]})
    out = replica(pa.table({"q": ["the ", "", "hello "], "extra": [1, 2, 3]})).to_pylist()
    expected = llm.generate(["the the ", "hello hello "], SamplingParams(temperature=0, max_tokens=4),
                            use_tqdm=False)
    assert [o["q"] for o in out] == ["the ", "", "hello "] and set(out[0]) == {"q", "answer", "error"}
    assert [out[0]["answer"], out[2]["answer"]] == [e["text"] for e in expected]
    assert out[1]["answer"] is None and "empty" in out[1]["error"]


@pytest.mark.parametrize("row, field", [({"n": 3}, "n=3"), ({"sampling_params": {"n": 2}}, "n=2"),
                                        ({"logprobs": 1}, "logprobs"), ({"prompt_logprobs": 0}, "prompt_logprobs")])
def test_row_fields_the_output_columns_cannot_hold_are_refused(field, row):
    """A row's output is one text: n > 1 kept the first sample and dropped the others without a word, and logprobs
    / prompt_logprobs were computed (or, as a column, ignored) with nowhere to go."""
    with pytest.raises(ValueError, match=field):
        row_sampling_params({"prompt": "x", **row}, {})
