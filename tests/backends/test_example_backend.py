"""The out-of-tree example backend, installed the way a third party's would be (`pip install ./examples/...`)."""
import pytest

from nanovllm.cli import main
from nanovllm.core import plugins as plugins_module
from nanovllm.core.plugins import load_plugins
from nanovllm.testing.greedy import check_greedy_matches_reference
from nanovllm.testing.parity import check_kernel_parity, parity_cases

pytest.importorskip("nanovllm_example_backend", reason="the example backend is not installed; "
                    "run: pip install ./examples/nanovllm-example-backend")


def test_discovered_through_its_entry_point():
    eps = {ep.name: ep.value for ep in plugins_module._entry_points()}
    assert eps["example_cpu"] == "nanovllm_example_backend.plugin"
    plugins = load_plugins()
    assert plugins.plugin_of_backend["example_cpu"] == "example_cpu" and "example_cpu" not in plugins.failures


def test_its_kernels_are_chosen_in_nanovllm_backends(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("example_cpu (plugin example_cpu): available"):]
    assert "attention.decode   example_cpu/padded_gather" in section
    assert "attention.prefill  example_cpu/sdpa_padded" in section
    assert "kv_cache.store     example_cpu/cpu_ref_index" in section


def test_selectable_from_the_cli(tiny_qwen3, capsys):
    assert main(["generate", "--backend", "example_cpu", "--model", tiny_qwen3, "--max-tokens", "4",
                 "--num-kvcache-blocks", "64", "--max-model-len", "256", "the quick brown fox"]) == 0
    assert "--- 'the quick brown fox'" in capsys.readouterr().out


def test_engine_runs_its_kernels(tiny_qwen3):
    from nanovllm import LLM
    llm = LLM(tiny_qwen3, backend="example_cpu", num_kvcache_blocks=64, max_model_len=256)
    assert llm.engine.backend.name == "example_cpu"
    assert llm.engine.kernel_plan.choices["attention.decode"].impl.name == "padded_gather"


@pytest.mark.parametrize("cell", list(parity_cases(load_plugins(), backends=["example_cpu"])), ids=str)
def test_passes_the_parity_harness(cell):
    assert cell.skip_reason is None, cell.skip_reason
    assert check_kernel_parity(cell.backend, cell.impl) > 0


def test_greedy_tokens_equal_cpu_refs(tiny_qwen3):
    check_greedy_matches_reference(tiny_qwen3, "example_cpu", max_tokens=10)
