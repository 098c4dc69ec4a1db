"""Greedy generation and prefill logits from Hugging Face transformers, the ground truth."""
import torch
from transformers import AutoModelForCausalLM

from nanovllm import SamplingParams
from tests.conftest import random_prompts

PREEMPTION_MAX_TOKENS = 16


def load_hf(path: str):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0, -1].float()


def preemption_workload(vocab_size: int) -> tuple[list[list[int]], dict, SamplingParams]:
    """Prompts, engine options and greedy params where a 14-block cache and 64-token steps force chunked prefill,
    preemption and prefix-cache hits: what every backend's e2e test runs against cpu_ref and HF."""
    prompts = random_prompts(6, vocab_size, (1, 60), seed=5)
    prompts.append(prompts[0] + prompts[1][:20])  # shares a cached prefix with the first prompt
    prompts += random_prompts(1, vocab_size, (150, 150), seed=6)  # prefilled over 3 chunks
    options = dict(num_kvcache_blocks=14, max_model_len=192, max_num_seqs=8, max_num_batched_tokens=64)
    return prompts, options, SamplingParams(temperature=0, max_tokens=PREEMPTION_MAX_TOKENS, ignore_eos=True)
