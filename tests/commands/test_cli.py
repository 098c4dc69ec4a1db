"""The command line: help texts and defaults for every option, --version, bench without a checkpoint and
on the default model, backends --plan on the default model, generate's progress and stream timing."""
import argparse
import json

import pytest

from nanovllm import cli
from nanovllm.commands import generate
from nanovllm.commands.arguments import HelpFormatter, backend_options


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_has_help_that_shows_its_default():
    parsers = subcommand_parsers()
    assert {"generate", "backends", "bench", "tune"} <= set(parsers)
    for name, parser in parsers.items():
        formatter = HelpFormatter(prog=name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            if action.option_strings:
                assert "default" in formatter._get_help_string(action), f"{where} does not show its default"
            if action.option_strings and action.default not in (None, False):
                value, text = action.default, formatter._expand_help(action)
                shown = {str(value), f"{value:g}"} if isinstance(value, float) else {str(value)}
                assert any(v in text for v in shown), f"{where} does not show its default {value!r}: {text!r}"


def test_bench_help_names_no_repository_path_and_has_vllm_names():
    text = subcommand_parsers()["bench"].format_help()
    assert "shared/" not in text and "../" not in text
    for option in ("--num-prompts", "--input-len", "--output-len", "--num-seqs", "--max-input-len", "--no-floor"):
        assert option in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("nanovllm 0.1.0 (torch ")


def test_bench_on_random_weights_of_a_config(tiny_qwen3, capsys, monkeypatch):
    from nanovllm.llm import LLM
    streamed, run = [], LLM._run

    def spy(self, requests, stream, detokenize=None):
        streamed.append(stream)
        return run(self, requests, stream, detokenize)
    monkeypatch.setattr(LLM, "_run", spy)
    args = ["bench", "--config", f"{tiny_qwen3}/config.json", "--backend", "cpu", "--num-prompts", "3",
            "--input-len", "12", "--output-len", "5", "--fixed-lengths", "--max-model-len", "64", "--no-floor",
            "--no-progress", "--backend-option", "cpu_memory_fraction=0.2", "--backend-option",
            "gpu_memory_utilization=0.8"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output_tokens"] == 15 and result["num_prompts"] == 3 and "floor_s" not in result
    assert result["backend_options"] == {"cpu_memory_fraction": 0.2, "gpu_memory_utilization": 0.8}
    assert 0 < result["ttft_s"] <= result["seconds"]
    assert streamed == [False, False]  # the warm-up and the timed call: no per-step deltas with --no-progress


def test_bench_and_backends_plan_default_to_the_model_generate_uses(tiny_qwen3, monkeypatch, capsys):
    from nanovllm.checkpoint import default_model
    monkeypatch.setattr(default_model, "default_model_path", lambda cache=None: tiny_qwen3)
    assert cli.main(["bench", "--backend", "cpu", "--num-prompts", "2", "--output-len", "3", "--input-len", "10",
                     "--max-model-len", "64", "--no-floor", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == tiny_qwen3
    assert cli.main(["backends", "--plan", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"model {tiny_qwen3}" in out and "kernel plan for backend cpu" in out


def test_generate_shows_progress_on_stderr_unless_told_not_to(tiny_qwen3, monkeypatch, capsys):
    monkeypatch.setattr(generate, "PROGRESS_DELAY_S", 0)
    base = ["generate", "--model", tiny_qwen3, "--backend", "cpu", "--max-tokens", "5", "--max-model-len", "64",
            "hello", "world"]
    assert cli.main(base) == 0
    captured = capsys.readouterr()
    assert "Generating" in captured.err and "10/10" in captured.err and "tok" in captured.err
    assert captured.out.count("--- ") == 2
    assert cli.main(base + ["--no-progress"]) == 0
    assert "Generating" not in capsys.readouterr().err


def test_stream_reports_time_to_first_token(tiny_qwen3, capsys):
    args = ["generate", "--model", tiny_qwen3, "--backend", "cpu", "--max-tokens", "4", "--max-model-len", "64",
            "--stream", "hi"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "time to first token" in err and "4 output tokens" in err
    assert cli.main(args + ["--no-progress"]) == 0
    assert "time to first token" not in capsys.readouterr().err


def test_backend_option_needs_name_and_value():
    for pair in ("gpu_memory_utilization", " =0.8"):
        args = cli.build_parser().parse_args(["bench", "--backend-option", pair])
        with pytest.raises(ValueError, match="expected NAME=VALUE"):
            backend_options(args)


def test_backends_lists_each_backends_options(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "option gpu_memory_utilization (default 0.9): the share of the GPU's memory" in out
    assert "option cpu_memory_fraction (default 0.3)" in out
    assert "option fold_norms (default True): fold each layer's RMSNorms into the kernels around them" in out
    assert out.count("  for ") == out.count("  kernels:")  # each backend's query printed once


def test_backend_option_values_are_read_as_numbers_where_they_are():
    args = cli.build_parser().parse_args(["bench", "--backend-option", "a=2", "--backend-option", "b=0.5",
                                          "--backend-option", "c=fast"])
    assert backend_options(args) == {"a": 2, "b": 0.5, "c": "fast"}


def test_serve_checks_its_port_before_loading_the_model(tiny_qwen3, monkeypatch, capsys):
    """A port out of range is a usage error; a port in use is refused before the engine is built (loading a large
    model first would take minutes only to fail at bind)."""
    import socket

    import nanovllm.async_llm

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the port was checked")
    monkeypatch.setattr(nanovllm.async_llm, "AsyncLLM", no_engine)
    for port in ("99999", "-1", "http"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", tiny_qwen3, "--port", port])
        assert "--port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", tiny_qwen3, "--backend", "cpu_ref", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err


def test_bench_refuses_an_empty_workload_and_conflicting_or_unwritable_options(tiny_qwen3, monkeypatch, capsys,
                                                                              tmp_path):
    """0 or negative workload sizes were replaced by the defaults (or crashed with a TypeError); --config beside
    --model was ignored; a --json file in a missing folder failed only after the whole run."""
    for flag in ("--num-prompts", "--input-len", "--output-len"):
        for value in ("0", "-1"):
            with pytest.raises(SystemExit):
                cli.build_parser().parse_args(["bench", flag, value])
            assert flag in capsys.readouterr().err

    import nanovllm

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the options were checked")
    monkeypatch.setattr(nanovllm, "LLM", no_engine)
    assert cli.main(["bench", "--model", tiny_qwen3, "--config", f"{tiny_qwen3}/config.json"]) == 2
    assert "--model or --config" in capsys.readouterr().err
    missing = tmp_path / "missing" / "bench.jsonl"
    assert cli.main(["bench", "--model", tiny_qwen3, "--json", str(missing)]) == 2
    assert str(missing.parent) in capsys.readouterr().err


def test_backends_lists_the_named_backend_and_refuses_plan_options_without_plan(tiny_qwen3, capsys):
    """`--backend NAME` without --plan was ignored (every backend listed, even for an unknown name); --model,
    --save-plan and --kernel-plan without --plan were ignored too."""
    assert cli.main(["backends", "--backend", "cpu_ref"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu_ref (plugin cpu_ref): available") and "cuda (plugin" not in out
    assert cli.main(["backends", "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    for flag, value in (("--model", tiny_qwen3), ("--save-plan", "plan.toml"), ("--kernel-plan", "plan.toml")):
        assert cli.main(["backends", flag, value]) == 2
        assert f"{flag} needs --plan" in capsys.readouterr().err


def test_generate_into_a_closed_pipe_exits_quietly(tiny_qwen3):
    """`nanovllm generate ... | head -1` closed the pipe under the output: a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        run = subprocess.run([sys.executable, "-m", "nanovllm.cli", "generate", "--model", tiny_qwen3, "--backend",
                              "cpu_ref", "--max-model-len", "64", "--num-kvcache-blocks", "16", "--no-progress",
                              "--max-tokens", "2", "hello"], stdout=write, stderr=subprocess.PIPE, text=True,
                             timeout=120, env={**os.environ, "NANOVLLM_LOG_LEVEL": "WARNING"})
    finally:
        os.close(write)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
    assert run.returncode == 1


def test_ctrl_c_during_generate_exits_130_without_a_traceback(tiny_qwen3):
    import os
    import signal
    import subprocess
    import sys
    command = [sys.executable, "-m", "nanovllm.cli", "generate", "--model", tiny_qwen3, "--backend", "cpu_ref",
               "--max-model-len", "256", "--num-kvcache-blocks", "128", "--no-progress", "--stream",
               "--max-tokens", "250", "--temperature", "0", *[f"p{i}" for i in range(8)]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "NANOVLLM_LOG_LEVEL": "WARNING"})
    try:
        assert process.stdout.readline().startswith("--- 'p0'")  # the stream has begun: 2,000 tokens to go
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err and "nanovllm: interrupted" in err, err


def test_a_backend_option_given_as_a_flag_is_pointed_to_backend_option(capsys):
    """vLLM users type --gpu-memory-utilization 0.8: it is a backend option here, and the error says how to give
    it (it said only 'unrecognized arguments')."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--gpu-memory-utilization", "0.8"])
    err = capsys.readouterr().err
    assert "--backend-option gpu_memory_utilization=0.8" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--cpu-memory-fraction=0.5", "hi"])
    assert "--backend-option cpu_memory_fraction=0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--no-such-flag", "hi"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
