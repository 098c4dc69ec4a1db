"""The force-reference switch, and kernel plans saved, printed and replayed (issue 12, features 2 and 3)."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm import cli
from nanovllm.core import engine as engine_module

pytest.importorskip("nanovllm_example_backend", reason="the example backend is not installed; "
                    "pip install --no-deps ./examples/nanovllm-example-backend")

OPTIONS = dict(num_kvcache_blocks=64, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=512)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
GREEDY = SamplingParams(max_tokens=6)


def tokens(llm) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture
def no_user_toml(tmp_path, monkeypatch):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    monkeypatch.setenv("NANOVLLM_PLUGINS_TOML", str(empty))
    monkeypatch.delenv("NANOVLLM_KERNELS", raising=False)


def test_reference_switch_from_the_environment(tiny_qwen3, no_user_toml, monkeypatch):
    fast = LLM(tiny_qwen3, backend="example_cpu", **OPTIONS)
    assert fast.kernel_plan().choices["attention.decode"].impl.full_name == "example_cpu/padded_gather"
    expected = tokens(fast)  # before the next LLM is built: a second engine disturbs a live first one (seen on main)
    monkeypatch.setenv("NANOVLLM_KERNELS", "reference")
    ref = LLM(tiny_qwen3, backend="example_cpu", **OPTIONS)
    plan = ref.kernel_plan()
    assert {c.impl.backend for c in plan.choices.values()} == {"cpu_ref"}
    assert all(c.why == "forced to the reference kernel" for c in plan.choices.values())
    assert tokens(ref) == expected


def test_per_op_kernels_from_a_string_suggest_the_closest_name(tiny_qwen3, no_user_toml):
    llm = LLM(tiny_qwen3, backend="example_cpu", kernels="attention.decode=cpu_ref/torch_loop", **OPTIONS)
    assert llm.kernel_plan().choices["attention.decode"].why == "named by the user"
    with pytest.raises(ValueError, match="did you mean 'padded_gather'"):
        LLM(tiny_qwen3, backend="example_cpu", kernels={"attention.decode": "paded_gather"}, **OPTIONS)


def test_plan_saved_and_replayed(tiny_qwen3, no_user_toml, tmp_path):
    llm = LLM(tiny_qwen3, backend="example_cpu", **OPTIONS)
    path = llm.save_kernel_plan(str(tmp_path / "plan.toml"))
    expected = tokens(llm)
    text = open(path).read()
    assert text.index('[ops."kv_cache.store"]') < text.index('[ops."attention.prefill"]') < text.index('[ops."sampler"]')
    assert 'kernel = "example_cpu/padded_gather"' in text and 'version = "0.1.0"' in text
    replayed = LLM(tiny_qwen3, kernel_plan=path, **OPTIONS)  # the backend comes from the plan
    assert replayed.engine.backend.name == "example_cpu"
    assert {op: c.impl.full_name for op, c in replayed.kernel_plan().choices.items()} == {
        op: c.impl.full_name for op, c in llm.kernel_plan().choices.items()}
    assert tokens(replayed) == expected


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("example_cpu/padded_gather", "example_cpu/padded_gathr"),
     r"kernels\['attention.decode'\]='example_cpu/padded_gathr' is not a kernel.*did you mean"),
    (lambda t: t.replace('[ops."sampler"]', '[ops."sampler_old"]'), "has no kernel for op 'sampler'"),
])
def test_plan_that_cannot_be_honoured_fails_before_any_work(tiny_qwen3, no_user_toml, tmp_path, monkeypatch,
                                                             edit, message):
    path = LLM(tiny_qwen3, backend="example_cpu", **OPTIONS).save_kernel_plan(str(tmp_path / "plan.toml"))
    text = open(path).read()
    open(path, "w").write(edit(text))

    def no_model_runner(*args, **kwargs):
        raise AssertionError("the model was built although the plan cannot be honoured")
    monkeypatch.setattr(engine_module, "ModelRunner", no_model_runner)
    with pytest.raises(ValueError, match=message):
        LLM(tiny_qwen3, kernel_plan=path, **OPTIONS)


def test_plan_with_a_kernel_disabled_since_cannot_be_honoured(tiny_qwen3, no_user_toml, tmp_path, monkeypatch):
    path = LLM(tiny_qwen3, backend="example_cpu", **OPTIONS).save_kernel_plan(str(tmp_path / "plan.toml"))
    user = tmp_path / "user.toml"
    user.write_text('[backends]\ndisabled_kernels = ["example_cpu/padded_gather"]\n')
    monkeypatch.setenv("NANOVLLM_PLUGINS_TOML", str(user))
    with pytest.raises(ValueError, match=r"cannot be honoured: kernels\['attention.decode'\].*cannot serve this run: "
                                         r"disabled in plugins.toml"):
        LLM(tiny_qwen3, kernel_plan=path, **OPTIONS)


def test_backends_plan_prints_and_saves(tiny_qwen3, no_user_toml, tmp_path, capsys):
    assert cli.main(["backends", "--plan", "--model", tiny_qwen3, "--backend", "example_cpu",
                     "--save-plan", str(tmp_path / "p.toml")]) == 0
    out = capsys.readouterr().out
    assert "kernel plan for backend example_cpu (cpu, float32, head_dim 48, 4/2 heads" in out
    assert "attention.decode   example_cpu/padded_gather" in out and (tmp_path / "p.toml").is_file()
    assert cli.main(["backends", "--kernels", "reference"]) == 0
    out = capsys.readouterr().out
    assert "forced to the reference (cpu_ref) kernel for every op" in out and "example_cpu/" not in out
