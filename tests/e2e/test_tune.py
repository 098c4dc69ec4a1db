"""`nanovllm tune` writes its winners to the user's plugins.toml, and the next engine uses them (issue 12, feature 5)."""
import sys

import pytest

from nanovllm import LLM, cli

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytest.importorskip("nanovllm_example_backend", reason="the example backend is not installed; "
                    "pip install --no-deps ./examples/nanovllm-example-backend")

TINY = ["--max-num-seqs", "2", "--context-len", "32", "--prefill-tokens", "16", "--repeats", "1"]


@pytest.fixture
def user_toml(tmp_path, monkeypatch):
    path = tmp_path / "plugins.toml"
    monkeypatch.setenv("NANOVLLM_PLUGINS_TOML", str(path))
    monkeypatch.delenv("NANOVLLM_KERNELS", raising=False)
    return path


def test_tune_writes_preferences_the_next_engine_uses(tiny_qwen3, user_toml, capsys):
    user_toml.write_text('[backends]\norder = ["example_cpu", "cpu_ref"]  # mine\n')
    assert cli.main(["tune", "--backend", "example_cpu", "--model", tiny_qwen3, *TINY]) == 0
    out = capsys.readouterr().out
    assert "attention.decode" in out and "decode 2 x 32" in out and "example_cpu/padded_gather" in out
    text = user_toml.read_text()
    assert text.startswith('[backends]\norder = ["example_cpu", "cpu_ref"]  # mine')  # the user's lines stay
    assert "# chosen by tune on " in text
    settings = tomllib.loads(text)
    winners = settings["kernels"]["example_cpu"]
    assert set(winners) == {"kv_cache.store", "attention.prefill", "attention.decode", "sampler"}
    assert sorted(settings["tune"]["example_cpu"]["ops"]) == sorted(winners)
    plan = LLM(tiny_qwen3, backend="example_cpu", num_kvcache_blocks=32, max_model_len=128, max_num_seqs=2,
               max_num_batched_tokens=256).kernel_plan()
    for op, names in winners.items():
        first = names[0] if "/" in names[0] else f"example_cpu/{names[0]}"
        assert plan.choices[op].impl.full_name == first
        assert plan.choices[op].why.startswith("chosen by tune on ")
    assert cli.main(["tune", "--backend", "example_cpu", "--model", tiny_qwen3, *TINY]) == 0  # re-tunes its own


def test_tune_never_silently_replaces_a_choice_the_user_wrote(tiny_qwen3, user_toml, capsys):
    mine = '[kernels.example_cpu]\n"attention.decode" = ["padded_gather"]\n'
    user_toml.write_text(mine)
    assert cli.main(["tune", "--backend", "example_cpu", "--config", tiny_qwen3 + "/config.json", *TINY]) == 2
    err = capsys.readouterr().err
    assert "already sets 'attention.decode' in [kernels.example_cpu], written by you" in err and "--force" in err
    assert user_toml.read_text() == mine
    assert cli.main(["tune", "--backend", "example_cpu", "--model", tiny_qwen3, "--force", *TINY]) == 0
    assert "attention.decode" in tomllib.loads(user_toml.read_text())["tune"]["example_cpu"]["ops"]
