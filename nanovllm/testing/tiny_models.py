"""Tiny random Hugging Face checkpoints (Qwen3, Llama, Qwen2) with a locally trained BPE tokenizer.

Built on the spot with transformers and tokenizers, so tests need no download.
"""
import os

import torch

CORPUS = ("the quick brown fox jumps over the lazy dog. paris is the capital of france. "
          "a small engine runs large models fast on a gpu, a mac or a cpu. hello world! "
          "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ? ! ' \" ( ) [ ] { } - + = * / "
          "unicode: café naïve 東京 🙂 ") * 4

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ARCH = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=48)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict()),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
}


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(path: str, arch: str = "qwen3", num_layers: int = 2, hidden_size: int = 128,
                    num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 512, seed: int = 0,
                    init_std: float = 0.08, **overrides) -> str:
    """Write a random `arch` checkpoint with a tokenizer to `path` (if absent) and return the path."""
    import transformers
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    config_cls, model_cls, extra = ARCH[arch]
    tokenizer = build_tokenizer(vocab_size)
    config = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=init_std,
        tie_word_embeddings=arch != "llama", eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **{**extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32)
    with torch.no_grad():  # a visible spread of logits, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.normal_(0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
