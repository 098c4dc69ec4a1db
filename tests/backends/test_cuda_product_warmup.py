"""The cuda backend's start-up run of a layer's products at every row count a step can have
(backends/cuda/product_warmup.py): the row counts, which products and how each is called, and that it changes no
output. On a machine without CUDA the products run in cpu_ref engines in float32 (the folded layer's Triton
kernels interpreted); on a GPU every cuda engine runs it at start-up (the `warm_products` option, on by default),
so tests/backends/test_cuda_e2e.py compares its tokens with cpu_ref's.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be on before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.testing.tiny_models import make_tiny_model  # noqa: E402
from tests.backends.test_cuda_kernels import _cpu_skip_reason  # noqa: E402
from tests.backends.test_cuda_norm_folding import engine, fold_engine  # noqa: E402
from tests.conftest import random_prompts  # noqa: E402

pytestmark = pytest.mark.skipif(bool(_cpu_skip_reason()), reason=_cpu_skip_reason() or "")

PRODUCTS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("warm_qwen3")), "qwen3", head_dim=64)


def test_warm_up_rows_take_1_to_16_then_each_multiple_of_8_and_the_next_count_then_of_64():
    from nanovllm.backends.cuda.product_warmup import warm_up_rows
    rows = warm_up_rows(16384)
    assert rows == sorted(set(range(1, 17)) | {r for m in range(8, 8193, 8) for r in (m, m + 1)}
                          | {r for m in range(8256, 16385, 64) for r in (m, m + 1) if r <= 16384})
    assert all(r % 8 in (0, 1) for r in rows[16:]) and rows[-1] == 16384
    assert warm_up_rows(5) == [1, 2, 3, 4, 5]
    assert warm_up_rows(100, align=32) == list(range(1, 17)) + [32, 33, 64, 65, 96, 97, 100]
    assert warm_up_rows(200, align=8, exhaustive_rows=64, coarse_step=64) == list(range(1, 17)) + [
        17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57, 64, 65, 128, 129, 192, 193, 200]


@pytest.mark.parametrize("folded", [False, True])
def test_layer_products_are_the_first_layers_four_added_where_the_folded_layer_adds(model_path, folded):
    from nanovllm.backends.cuda.product_warmup import layer_products
    llm = engine(model_path)
    if folded:
        fold_engine(llm)
    model = llm.engine.runner.model
    products = layer_products(model)
    assert [name for name, _, _ in products] == PRODUCTS
    layer = model.model.layers[0]
    assert all(module is layer.get_submodule(name) for name, module, _ in products)
    added = [name for name, _, add in products if add]
    assert added == (["self_attn.o_proj", "mlp.down_proj"] if folded else [])
    assert layer_products(torch.nn.Linear(2, 2)) == []
    llm.close()


@pytest.mark.parametrize("folded", [False, True])
def test_warm_up_calls_each_product_at_each_row_count_as_the_layer_calls_it(model_path, folded, monkeypatch):
    """Unfolded: each module's linear_op at every row count; folded: o and down through add_product, on a
    residual of the product's width; the engine's tokens are those of an engine that never warmed."""
    from nanovllm.backends.cuda import norm_folding
    from nanovllm.backends.cuda.product_warmup import warm_up_products, warm_up_rows
    prompts = random_prompts(3, 512, (5, 30), seed=11)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm = engine(model_path)
    if folded:
        fold_engine(llm)
    expected = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.reset_prefix_cache()
    model = llm.engine.runner.model
    layer = model.model.layers[0]
    seen = []
    for name in PRODUCTS:
        module = layer.get_submodule(name)

        def spy(x, weight, bias=None, name=name, op=module.linear_op):
            seen.append((name, x.shape[0], "linear"))
            out = op(x, weight, bias)
            assert out.shape == (x.shape[0], weight.shape[0])
            return out
        monkeypatch.setattr(module, "linear_op", spy, raising=False)
    real_add = norm_folding.add_product

    def add_spy(linear, x, residual):
        name = next(n for n in PRODUCTS if layer.get_submodule(n) is linear)
        assert residual.shape == (x.shape[0], linear.weight.shape[0])
        seen.append((name, x.shape[0], "add"))
        return real_add(linear, x, residual)
    monkeypatch.setattr(norm_folding, "add_product", add_spy)
    calls = warm_up_products(model, 70, align=32)
    rows = warm_up_rows(70, align=32)
    assert rows == list(range(1, 17)) + [32, 33, 64, 65, 70]
    assert calls == len(rows) * 4 == len(seen)
    kinds = {"self_attn.o_proj": "add", "mlp.down_proj": "add"} if folded else {}
    assert seen == [(name, m, kinds.get(name, "linear")) for m in rows for name in PRODUCTS]
    monkeypatch.undo()
    assert [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    llm.close()


def test_warm_products_is_an_option_checked_whichever_backend_runs(model_path):
    with pytest.raises(ValueError, match="warm_products=2 is invalid"):
        LLM(model_path, backend="cpu_ref", warm_products=2)
    llm = LLM(model_path, backend="cpu_ref", num_kvcache_blocks=32, max_model_len=256, warm_products=False)
    assert llm.config.backend_options["warm_products"] is False
    llm.close()


def test_products_take_the_bias_as_the_layer_forward_passes_it(tiny_llama_biased):
    """Column-parallel layers pass their bias into the product; a row-parallel one (o, down) adds it after the
    all-reduce, so its product runs without one, as its forward calls it."""
    from nanovllm.backends.cuda.product_warmup import layer_products, product_calls
    llm = LLM(tiny_llama_biased, backend="cpu_ref", num_kvcache_blocks=32, max_model_len=256)
    products = layer_products(llm.engine.runner.model)
    seen = {}
    for name, module, _ in products:
        assert module.bias is not None
        module.linear_op = lambda x, weight, bias=None, name=name, op=module.linear_op: (
            seen.setdefault(name, bias), op(x, weight, bias))[1]
    for _, call in product_calls(products, 8):
        call(8)
    assert {name: bias is not None for name, bias in seen.items()} == {
        "self_attn.qkv_proj": True, "self_attn.o_proj": False, "mlp.gate_up_proj": True, "mlp.down_proj": False}
    llm.close()
