"""End-to-end greedy parity: a backend's greedy tokens on a small random model equal cpu_ref's."""
import torch

from nanovllm.sampling_params import SamplingParams

ENGINE_OPTIONS = dict(num_kvcache_blocks=256, kvcache_block_size=16, max_model_len=512, dtype="float32")


def random_token_prompts(num_prompts: int = 6, vocab_size: int = 512, max_len: int = 60, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num_prompts,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy_tokens(model_path: str, backend: str, prompts: list[list[int]], max_tokens: int, **options) -> list[list[int]]:
    from nanovllm import LLM
    llm = LLM(model_path, backend=backend, **{**ENGINE_OPTIONS, **options})
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def check_greedy_matches_reference(model_path: str, backend: str, prompts: list[list[int]] | None = None,
                                   max_tokens: int = 12, **options) -> None:
    """Raise AssertionError when `backend`'s greedy tokens differ from cpu_ref's (float32 on both by default).

    Build the model with `nanovllm.testing.tiny_models.make_tiny_model(path)`; `options` go to both engines.
    """
    prompts = prompts if prompts is not None else random_token_prompts()
    # cpu_ref's own kernels: a third-party kernel registered for cpu_ref never stands in for the oracle
    expected = greedy_tokens(model_path, "cpu_ref", prompts, max_tokens, **{**options, "kernels": "reference"})
    got = greedy_tokens(model_path, backend, prompts, max_tokens, **options)
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            first = next(j for j, (a, b) in enumerate(zip(g, e)) if a != b) if len(g) == len(e) else min(len(g), len(e))
            raise AssertionError(f"{backend}: greedy tokens of prompt {i} (length {len(prompts[i])}) diverge from "
                                 f"cpu_ref at output token {first}: {g} != {e}")
