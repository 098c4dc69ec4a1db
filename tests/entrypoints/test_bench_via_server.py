"""`nanovllm bench --via-server` on cpu_ref with a tiny random config: the HTTP run produces every output token the
offline run does, and the figures are reported."""
import json

from nanovllm.cli import main


def test_bench_via_server_reports_both_runs(tiny_qwen3, tmp_path, capsys):
    config = json.load(open(f"{tiny_qwen3}/config.json"))
    config["vocab_size"] = 10240  # the seed workload draws token ids below 10000
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "--backend", "cpu_ref", "--config", str(tmp_path / "config.json"), "--num-seqs", "8",
                 "--max-input-len", "32", "--max-output-len", "8", "--max-model-len", "128", "--max-num-seqs", "8",
                 "--num-kvcache-blocks", "64", "--no-progress", "--no-floor", "--via-server", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["via_server_requests"] == 8
    assert result["via_server_output_tokens"] == result["output_tokens"] > 0
    assert result["via_server_ratio"] > 0
    assert "of offline" in capsys.readouterr().out
