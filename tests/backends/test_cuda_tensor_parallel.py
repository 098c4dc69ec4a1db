"""On two GPUs: tensor_parallel_size=2 over NCCL gives the greedy tokens of one GPU, eager and with graphs."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

MODELS = ["tiny_qwen3"]


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("model_fixture", MODELS)
def test_tp2_equals_tp1_on_cuda(model_fixture, enforce_eager, request):
    path = request.getfixturevalue(model_fixture)
    prompts = random_prompts(6, 512, (1, 200), seed=21)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    options = dict(backend="cuda", dtype="float32", max_model_len=512, num_kvcache_blocks=256,
                   enforce_eager=enforce_eager, max_num_seqs=16)
    outputs = {}
    for tp in (1, 2):
        with LLM(path, tensor_parallel_size=tp, **options) as llm:
            outputs[tp] = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs[2] == outputs[1]
