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


def test_bench_on_random_weights_of_a_config(tiny_qwen3, capsys):
    args = ["bench", "--config", f"{tiny_qwen3}/config.json", "--backend", "cpu", "--num-prompts", "3",
            "--input-len", "12", "--output-len", "5", "--fixed-lengths", "--max-model-len", "64", "--no-floor",
            "--no-progress", "--backend-option", "cpu_memory_fraction=0.2", "--backend-option",
            "gpu_memory_utilization=0.8"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output_tokens"] == 15 and result["num_prompts"] == 3 and "floor_s" not in result
    assert result["backend_options"] == {"cpu_memory_fraction": 0.2, "gpu_memory_utilization": 0.8}
    assert 0 < result["ttft_s"] <= result["seconds"]


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
    assert out.count("  for ") == out.count("  kernels:")  # each backend's query printed once


def test_backend_option_values_are_read_as_numbers_where_they_are():
    args = cli.build_parser().parse_args(["bench", "--backend-option", "a=2", "--backend-option", "b=0.5",
                                          "--backend-option", "c=fast"])
    assert backend_options(args) == {"a": 2, "b": 0.5, "c": "fast"}

