"""The cuda backend end to end against cpu_ref on the tiny random Qwen3 (needs a GPU; skipped without)."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.backends.cuda.compiled import compiled_variants
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """head_dim 64: a size the Triton kernels serve (the shared tiny model's 48 is refused by their checks)."""
    from nanovllm.testing.tiny_models import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3_hd64")), "qwen3", head_dim=64)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(12, 512, (1, 300), seed=11)


@pytest.fixture(scope="module")
def reference(tiny_qwen3, prompts):
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=512, max_model_len=1024)
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("block_size", [16, 256])
def test_float32_greedy_equals_cpu_ref(tiny_qwen3, prompts, reference, enforce_eager, block_size):
    llm = LLM(tiny_qwen3, backend="cuda", dtype="float32", enforce_eager=enforce_eager, max_model_len=1024,
              kvcache_block_size=block_size, num_kvcache_blocks=4096 // block_size * 8, max_num_seqs=16,
              max_num_batched_tokens=1024)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == reference
    assert (llm.engine.runner.graphs is None) == enforce_eager
    plan = {op: c.impl.backend for op, c in llm.engine.kernel_plan.choices.items()}
    assert plan["attention.decode"] == plan["kv_cache.store"] == "cuda", plan


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_norms_folded_by_default_and_unfolded_by_option(tiny_qwen3, prompts, reference, fold):
    """backends/cuda/norm_folding.py: the decoder gets the folded forward unless fold_norms is off; cpu_ref's tokens
    either way (the float32 runs above fold too)."""
    llm = LLM(tiny_qwen3, backend="cuda", dtype="float32", max_model_len=1024, num_kvcache_blocks=512,
              max_num_seqs=16, **({} if fold else {"fold_norms": False}))
    assert ("forward" in vars(llm.engine.runner.model.model)) == fold
    assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference


def test_plain_decode_steps_sample_inside_the_graphs(tiny_qwen3, prompts, reference):
    """Greedy decode steps take the captured sampler's tokens (equal to cpu_ref's); sampled ones draw fresh tokens
    each step; a step whose requests ask for logprobs samples the graph's logits outside, to the same tokens."""
    llm = LLM(tiny_qwen3, backend="cuda", dtype="float32", max_model_len=1024, num_kvcache_blocks=512,
              max_num_seqs=16)
    graphs = llm.engine.runner.graphs
    assert graphs.samples
    calls = []
    run_and_sample = graphs.run_and_sample
    graphs.run_and_sample = lambda *args: calls.append(len(args[0])) or run_and_sample(*args)
    assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    assert len(calls) >= 15  # 15 decode steps for each request
    calls.clear()
    with_logprobs = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    assert [o["token_ids"] for o in llm.generate(prompts, with_logprobs, use_tqdm=False)] == reference
    assert not calls
    sampled = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    first, second = ([o["token_ids"] for o in llm.generate(prompts, sampled, use_tqdm=False)] for _ in range(2))
    assert calls and first != second and all(len(t) == 16 for t in first + second)


def test_decode_steps_arrive_in_the_graphs_inputs_in_place(tiny_qwen3, prompts, reference):
    """The graphs capture the step builder's device record (core/decode_record.py): every graphed decode step is
    built in place, padded to a captured size, and replayed without copying its inputs in; tokens equal cpu_ref's
    (12 requests finishing at different steps: batches between the captured sizes are padded)."""
    llm = LLM(tiny_qwen3, backend="cuda", dtype="float32", max_model_len=1024, num_kvcache_blocks=512,
              max_num_seqs=16)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs.records is runner.inputs.records and runner.inputs.pad_sizes == graphs.batch_sizes
    assert graphs.records[0] is not graphs.records[1]
    copied, replays = [], []
    graphs._copy_in = lambda *args: copied.append(args[4])
    replay = graphs._replay
    graphs._replay = lambda *args: replays.append(len(args[0])) or replay(*args)
    assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    assert len(replays) >= 15 and not copied
    assert set(replays) - set(graphs.batch_sizes), replays  # some steps ran padded


def test_bfloat16_logits_close_to_cpu_ref(tiny_qwen3, prompts):
    from tests.e2e.test_hf_parity import prefill_logits
    ref = prefill_logits(LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, max_model_len=1024), prompts)
    ours = prefill_logits(LLM(tiny_qwen3, backend="cuda", dtype="bfloat16", num_kvcache_blocks=256,
                              max_model_len=1024), prompts).float().cpu()
    scale = ref.abs().max()
    assert (ours - ref).abs().max() / scale < 3e-2
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_prefix_cache_and_chunked_prefill_on_cuda(tiny_qwen3, prompts, reference):
    prefix = random_prompts(1, 512, (64, 64), seed=12)[0]
    shared = [prefix + p for p in prompts[:4]]
    base = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=512, max_model_len=1024)
    want = [o["token_ids"] for o in base.generate(shared, GREEDY, use_tqdm=False)]
    llm = LLM(tiny_qwen3, backend="cuda", dtype="float32", max_model_len=1024, num_kvcache_blocks=512,
              kvcache_block_size=16, max_num_batched_tokens=128, max_num_seqs=8)
    llm.generate(shared[:1], GREEDY, use_tqdm=False)
    outputs = llm.generate(shared, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.block_manager.num_prefix_hit_tokens > 0
    assert [o["token_ids"] for o in outputs] == want


def test_no_kernel_is_compiled_after_start_up(tiny_qwen3):
    """Start-up (warm-ups and graph capture) compiles every Triton variant and torch.compile graph a run needs, so
    no request pays a compilation: here a batch with full-size, chunked, cached-prefix and mixed steps."""
    from torch._dynamo.utils import counters
    llm = LLM(tiny_qwen3, backend="cuda", max_model_len=1024, num_kvcache_blocks=512, max_num_seqs=16,
              max_num_batched_tokens=512)
    before, graphs_before = compiled_variants(), counters["stats"]["unique_graphs"]
    assert sum(before.values()) > 0
    prompts = random_prompts(24, 512, (1, 300), seed=13)
    prompts += [prompts[0] + p for p in prompts[1:4]]  # cached prefixes
    outputs = llm.generate(prompts, SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert all(len(o["token_ids"]) == 40 for o in outputs)
    after = compiled_variants()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert counters["stats"]["unique_graphs"] == graphs_before


@pytest.mark.parametrize("step_tokens", [1024, 4096])
def test_long_contexts_compile_nothing_after_start_up(tmp_path_factory, step_tokens):
    """At head_dim 128 the bf16 prefill picks its tiles by the step's longest context (triton_prefill.prefill_config):
    the start-up warm-up's longest-context chunk compiles the long-context tiles for the paged prefill, and the
    peak-memory step (runner_setup.measure_peak: max_model_len-long prompts, no cache) those for a long prompt with
    no cached prefix, which the Triton prefill serves too since round twenty-three. So short prompts and a
    3,000-token prompt, chunked (1,024-token steps) or whole (4,096), compile nothing after start-up (both tile
    configs match the reference in test_cuda_kernels)."""
    from nanovllm.testing.tiny_models import make_tiny_model
    model = make_tiny_model(str(tmp_path_factory.mktemp("qwen3_hd128")), "qwen3", head_dim=128)
    prompts = random_prompts(6, 512, (1, 300), seed=17) + random_prompts(1, 512, (3000, 3000), seed=18)
    llm = LLM(model, backend="cuda", dtype="bfloat16", max_model_len=4096, num_kvcache_blocks=1024, max_num_seqs=8,
              max_num_batched_tokens=step_tokens)
    before = compiled_variants()
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(len(o["token_ids"]) == GREEDY.max_tokens for o in outputs)
    assert compiled_variants() == before, "a kernel variant was compiled after start-up"


def test_big_mixed_prefill_steps_read_new_prompts_apart(tmp_path_factory, monkeypatch):
    """A prefill step of >= 8,192 tokens that continues one prompt and starts others (the seed benchmark's later
    prefill steps) reads the new prompts' K/V from the step's tensors in a launch of their own
    (triton_prefill.split_launch). Its kernels compile at start-up (the warm-up's paged step is such a step), and
    the greedy tokens equal those of a run that reads every sequence through the block table."""
    from nanovllm.backends.cuda.attention import triton_prefill
    from nanovllm.testing.tiny_models import make_tiny_model
    model = make_tiny_model(str(tmp_path_factory.mktemp("qwen3_hd128_split")), "qwen3", head_dim=128)
    prompts = random_prompts(48, 512, (400, 800), seed=21)  # ~29,000 tokens: the second 16,384-token step is mixed
    launches = []
    launch = triton_prefill._launch

    def recorded(*args, prefix, **kwargs):
        launches.append(prefix)
        return launch(*args, prefix=prefix, **kwargs)
    monkeypatch.setattr(triton_prefill, "_launch", recorded)

    def run():
        llm = LLM(model, backend="cuda", dtype="bfloat16", max_model_len=1024, num_kvcache_blocks=4096,
                  max_num_seqs=64)
        before = compiled_variants()
        launches.clear()
        tokens = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert compiled_variants() == before, "a kernel variant was compiled after start-up"
        llm.close()
        return tokens

    split = run()
    assert 1 in launches and 2 in launches
    monkeypatch.setattr(triton_prefill, "SPLIT_LAUNCH_TOKENS", 1 << 30)
    whole = run()
    assert 1 not in launches and 0 in launches
    assert split == whole
