"""nanovllm.ray on a local Ray cluster of two simulated nodes (ray.cluster_utils.Cluster): cpu_ref replicas of
the tiny model give row for row what one LLM.generate gives, through a killed replica and refused rows.

One cluster serves the whole module (started by a fixture, shut down after it); every job runs under a time limit.
"""
import contextlib
import json
import signal

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main
from nanovllm.ray import ProcessorConfig, build_processor

ENGINE = dict(num_kvcache_blocks=128, max_model_len=128)
DEFAULTS = {"temperature": 0.0, "max_tokens": 8}
OBJECT_STORE_BYTES = 128 * 2**20
REPLICA_TITLE = "MapWorker(MapBatches(LLMReplica))"
WORDS = "the quick brown fox jumps over lazy dog paris is capital of france hello world".split()


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"the Ray job took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def cluster():
    with time_limit(90):
        nodes = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=2, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False))
        nodes.add_node(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES)
        ray.init(address=nodes.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", **ENGINE)


def make_rows(n: int) -> list[dict]:
    """Text, chat and token-id prompts, greedy; every 4th row sampled with a seed, and the rows 40 apart among
    those share prompt and seed (so they land in different batches and on different replicas)."""
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i % 9)]
        row = {"id": i, "prompt": None, "messages": None, "prompt_token_ids": None, "temperature": None,
               "seed": None, "max_tokens": 4 + i % 11}
        if i % 4 == 0:
            row["prompt"] = " ".join(words)
        elif i % 4 == 1:
            row["messages"] = [{"role": "user", "content": " ".join(words)}]
        elif i % 4 == 2:
            row["prompt_token_ids"] = [3 + (i * 13 + j * 29) % 500 for j in range(1 + i % 17)]
        else:
            row.update(prompt=" ".join(WORDS[(i % 40 + j) % len(WORDS)] for j in range(4)), temperature=0.9,
                       seed=i % 40, max_tokens=12)
        rows.append(row)
    return rows


def expected_outputs(llm: LLM, rows: list[dict]) -> list[dict]:
    """One LLM.generate over every row's prompt and sampling fields."""
    prompts = [r["prompt"] if r["prompt"] is not None else r["prompt_token_ids"] if r["prompt_token_ids"] is not None
               else llm.chat_prompt(r["messages"]) for r in rows]
    params = [SamplingParams(**{**DEFAULTS, **{k: r[k] for k in ("temperature", "seed", "max_tokens")
                                               if r[k] is not None}}) for r in rows]
    return llm.generate(prompts, params, use_tqdm=False)


def check_outputs(out: list[dict], rows: list[dict], expected: list[dict]) -> None:
    assert sorted(r["id"] for r in out) == [r["id"] for r in rows], "every row exactly once"
    by_id = {r["id"]: r for r in out}
    for row, e in zip(rows, expected):
        got = by_id[row["id"]]
        assert {k: got[k] for k in row} == row, "input columns kept"
        assert (got["generated_text"], list(got["token_ids"]), got["finish_reason"], got["num_prompt_tokens"],
                got["num_generated_tokens"], got["error"]) == \
               (e["text"], e["token_ids"], e["finish_reason"], len(e["prompt_token_ids"]), len(e["token_ids"]),
                None), f"row {row['id']}"


def processor_config(model: str, **overrides) -> ProcessorConfig:
    return ProcessorConfig(**{"model": model, "backend": "cpu_ref", "engine_options": ENGINE,
                              "sampling_params": DEFAULTS, "concurrency": 2, "batch_size": 16, **overrides})


def test_two_replicas_give_row_for_row_what_one_llm_gives(cluster, tiny_qwen3, reference):
    rows = make_rows(200)
    expected = expected_outputs(reference, rows)
    with time_limit(120):
        out = build_processor(processor_config(tiny_qwen3))(ray.data.from_items(rows)).take_all()
    check_outputs(out, rows, expected)
    seeded = [r for r in out if r["seed"] is not None]
    for r in seeded:  # the same seed and prompt, the same tokens, whichever replica and batch ran it
        assert list(r["token_ids"]) == list(next(s for s in seeded if s["seed"] == r["seed"])["token_ids"])
    assert len({tuple(r["token_ids"]) for r in seeded}) > 1


def replica_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if any(REPLICA_TITLE in part for part in _cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return process.cmdline()
    return []


def test_a_killed_replica_is_restarted_and_its_batches_retried(cluster, tiny_qwen3, reference):
    rows = make_rows(120)
    expected = expected_outputs(reference, rows)
    dataset = build_processor(processor_config(tiny_qwen3, batch_size=8))(ray.data.from_items(rows))
    out, killed, seen, done_at_kill = [], None, set(), None
    with time_limit(150):
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            out += batch.to_pylist()
            seen |= {p.pid for p in replica_processes()}
            if killed is None:
                replicas = replica_processes()  # a replica in the middle of a batch, if one is
                killed = next((p for p in replicas if any(".submit" in c for c in _cmdline(p))), replicas[0])
                killed.send_signal(signal.SIGKILL)  # as an OOM kill would: no cleanup, no goodbye
                killed.wait(10)
                done_at_kill = len(out)
    assert done_at_kill < len(rows), "the replica was killed before the job finished"
    assert len(seen - {killed.pid}) >= 2, "a replica process started in place of the killed one"
    check_outputs(out, rows, expected)


def test_refused_rows_get_an_error_and_leave_the_others_alone(cluster, tiny_qwen3, reference):
    rows = make_rows(48)
    bad = {5: dict(prompt="", messages=None), 17: dict(messages=None, prompt_token_ids=[4] * 300),
           30: dict(temperature=-1.0), 41: dict(prompt="the", prompt_token_ids=[3])}
    refused = [{**r, **bad[r["id"]]} if r["id"] in bad else r for r in rows]
    good = [r for r in rows if r["id"] not in bad]
    with time_limit(120):
        out = build_processor(processor_config(tiny_qwen3, batch_size=6))(ray.data.from_items(refused)).take_all()
    errors = {r["id"]: r["error"] for r in out if r["error"] is not None}
    assert sorted(errors) == sorted(bad)
    assert "the prompt is empty" in errors[5] and "the prompt has 300 tokens" in errors[17]
    assert "SamplingParams.temperature=-1.0" in errors[30] and "exactly one of" in errors[41]
    check_outputs([r for r in out if r["id"] not in bad], good, expected_outputs(reference, good))


def test_tensor_parallel_replica_runs_in_its_placement_group(cluster, tiny_qwen3, reference):
    rows = make_rows(16)
    processor = build_processor(processor_config(tiny_qwen3, concurrency=1,
                                                 engine_options={**ENGINE, "tensor_parallel_size": 2}))
    try:
        with time_limit(120):
            out = processor(ray.data.from_items(rows)).take_all()
        assert [g.bundle_specs for g in processor.placement_groups] == [[{"CPU": 2}]]
    finally:
        processor.release()
    assert processor.placement_groups == []
    check_outputs(out, rows, expected_outputs(reference, rows))


def test_cli_batch_on_ray_round_trips_jsonl(cluster, tiny_qwen3, tmp_path):
    rows = [{k: v for k, v in r.items() if v is not None} for r in make_rows(24)] + [{"id": 24, "prompt": ""}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", tiny_qwen3, "--backend", "cpu_ref", "--max-tokens", "8", "--batch-size", "5",
              "--num-kvcache-blocks", "128", "--max-model-len", "128"]
    with time_limit(120):
        assert main(["batch", str(src), str(tmp_path / "ray.jsonl"), "--replicas", "2",
                     "--address", cluster.address, *common]) == 0
    assert main(["batch", str(src), str(tmp_path / "local.jsonl"), *common]) == 0
    on_ray = (tmp_path / "ray.jsonl").read_text().splitlines()
    assert on_ray == (tmp_path / "local.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in on_ray]
    assert [{k: o[k] for k in r} for o, r in zip(out, rows)] == rows
    assert [o["error"] is not None for o in out] == [False] * 24 + [True]
    assert ray.is_initialized(), "the CLI leaves a Ray it did not start running"
