"""Every engine option at its boundary values (1, powers of two, the largest allowed) builds an engine that runs,
and gives the greedy tokens of the default settings; values past the boundary are refused naming the option."""
import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[7, 8, 9, 10, 11] * 4, [3, 4, 5]]
BASE = dict(backend="cpu_ref", num_kvcache_blocks=64, max_model_len=128)

BOUNDARIES = [
    dict(max_num_seqs=1),
    dict(max_num_seqs=1, max_num_batched_tokens=1),  # one token per step: chunked prefill all the way
    dict(max_num_seqs=2, max_num_batched_tokens=2),
    dict(max_num_seqs=64, max_num_batched_tokens=64),
    dict(max_num_seqs=2**20, max_num_batched_tokens=2**20),  # more than the KV blocks: clamped to them
    dict(max_num_batched_tokens=2**40),
    dict(max_model_len=32),
    dict(max_model_len=2**40, num_kvcache_blocks=256),  # clamped to max_position_embeddings (4096)
    dict(kvcache_block_size=1, num_kvcache_blocks=128),
    dict(kvcache_block_size=2),
    dict(kvcache_block_size=128, num_kvcache_blocks=1),  # one block holds a whole max_model_len sequence
    dict(kvcache_block_size=4096, num_kvcache_blocks=2),
    dict(num_kvcache_blocks=8),  # 8 blocks of 16 tokens = exactly one max_model_len sequence
    dict(tensor_parallel_size=1),
    dict(verify_kernels=1),
    dict(async_scheduling=False, enforce_eager=True, compile=False),
    dict(seed=2**64 - 1),
    dict(cpu_memory_fraction=1e-6, num_kvcache_blocks=None, max_model_len=32, kvcache_block_size=32),
]


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    return [o["token_ids"] for o in LLM(tiny_qwen3, **BASE).generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("options", BOUNDARIES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_boundary_values_build_and_run(tiny_qwen3, reference, options):
    llm = LLM(tiny_qwen3, **{**BASE, **options})
    outputs = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    max_len = llm.config.max_model_len
    assert outputs == [r[:max_len - len(p)] for r, p in zip(reference, PROMPTS)]
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])


def test_max_model_len_of_one_builds_and_refuses_every_prompt(tiny_qwen3):
    llm = LLM(tiny_qwen3, **{**BASE, "max_model_len": 1})
    with pytest.raises(ValueError, match=r"prompts\[0\] has 1 tokens; with max_model_len=1"):
        llm.generate([[5]], GREEDY, use_tqdm=False)


PAST_THE_BOUNDARY = [
    (dict(max_num_seqs=0), "max_num_seqs=0 is invalid"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens=0 is invalid"),
    (dict(max_num_seqs=4, max_num_batched_tokens=2), "max_num_batched_tokens=2 is smaller than max_num_seqs=4"),
    (dict(kvcache_block_size=0), "kvcache_block_size=0 is invalid"),
    (dict(kvcache_block_size=3), "kvcache_block_size=3 is invalid: expected a power of two"),
    (dict(num_kvcache_blocks=7), "KV cache budget of 7 blocks"),
    (dict(cpu_memory_fraction=1.5), "cpu_memory_fraction=1.5 is invalid"),
    (dict(verify_kernels=0), "verify_kernels=0 is invalid"),
]


@pytest.mark.parametrize("options, message", PAST_THE_BOUNDARY, ids=[m for _, m in PAST_THE_BOUNDARY])
def test_past_the_boundary_is_refused(tiny_qwen3, options, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_qwen3, **{**BASE, **options})
