"""Greedy generation and prefill logits from Hugging Face transformers, the ground truth."""
import torch
from transformers import AutoModelForCausalLM


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
