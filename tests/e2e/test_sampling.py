"""Sampling through the engine: greedy equivalences, seeds, stop conditions, min_tokens, finish reasons, logprobs."""
import json
import math
import shutil

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.core.detokenizer import decode
from tests.e2e.hf_reference import hf_last_logits, load_hf

PROMPTS = ["paris is the capital of", "hello world", "the quick"]


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=128, max_model_len=256)


def run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def sampled(seed, **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 10), ignore_eos=True, **kw)


def test_top_k_1_equals_greedy(llm):
    greedy = run(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    top1 = run(llm, PROMPTS, SamplingParams(temperature=0.9, top_k=1, max_tokens=6, ignore_eos=True))
    assert [o["token_ids"] for o in top1] == [o["token_ids"] for o in greedy]


def test_seeded_runs_reproducible_across_calls_and_batch_compositions(llm):
    alone = run(llm, [PROMPTS[0]], sampled(42))[0]["token_ids"]
    assert run(llm, [PROMPTS[0]], sampled(42))[0]["token_ids"] == alone
    batch = run(llm, [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]],
                [SamplingParams(max_tokens=4), sampled(42), sampled(7, top_p=0.9), sampled(43)])
    assert batch[1]["token_ids"] == alone
    assert batch[3]["token_ids"] != alone, "different seeds gave the same tokens"


def boundary_stop_string(llm, output) -> str:
    """Two characters around a boundary between two output tokens, each token giving plain text."""
    ids, text = output["token_ids"], output["text"]
    for j in range(2, len(ids) - 1):
        before, after = decode(llm.tokenizer, ids[:j]), decode(llm.tokenizer, ids[:j + 1])
        stop = text[len(before) - 1:len(before) + 1]
        if text.startswith(after) and len(after) > len(before) > 0 and "\ufffd" not in stop:
            return stop
    raise AssertionError(f"no token boundary with plain text on both sides in {text!r}")


def test_stop_string_spanning_a_token_boundary_is_cut(llm):
    reference = run(llm, [PROMPTS[0]], sampled(3, max_tokens=16))[0]
    stop = boundary_stop_string(llm, reference)
    out = run(llm, [PROMPTS[0]], sampled(3, max_tokens=16, stop=["never seen", stop]))[0]
    cut = reference["text"].find(stop)
    assert out["text"] == reference["text"][:cut] and out["finish_reason"] == "stop"
    n = len(out["token_ids"])
    assert out["token_ids"] == reference["token_ids"][:n] and stop in decode(llm.tokenizer, out["token_ids"])
    assert stop not in decode(llm.tokenizer, out["token_ids"][:-1]), "did not stop at the token completing it"


def test_stop_token_ids_stop_and_their_text_is_left_out(llm):
    reference = run(llm, [PROMPTS[1]], sampled(5, max_tokens=16))[0]["token_ids"]
    stop_token = reference[6]
    k = reference.index(stop_token)
    out = run(llm, [PROMPTS[1]], sampled(5, max_tokens=16, stop_token_ids=[stop_token]))[0]
    assert out["token_ids"] == reference[:k + 1] and out["finish_reason"] == "stop"
    assert out["text"] == decode(llm.tokenizer, reference[:k])


def test_min_tokens_defers_stop_strings(llm):
    reference = run(llm, [PROMPTS[0]], sampled(3, max_tokens=10))[0]
    stop = next(c for c in reference["text"] if c.isprintable() and c != "\ufffd")
    early = run(llm, [PROMPTS[0]], sampled(3, max_tokens=10, stop=stop))[0]
    assert early["text"] == reference["text"][:reference["text"].index(stop)] and early["finish_reason"] == "stop"
    late = run(llm, [PROMPTS[0]], sampled(3, max_tokens=10, stop=stop, min_tokens=len(early["token_ids"])))[0]
    assert len(late["token_ids"]) > len(early["token_ids"])
    assert late["token_ids"] == reference["token_ids"][:len(late["token_ids"])]


@pytest.fixture(scope="module")
def eos_model(tiny_qwen3, tmp_path_factory):
    """The tiny model with EOS set to the token it greedily repeats after "the quick" (164)."""
    path = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_qwen3, path)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = 164
    (path / "config.json").write_text(json.dumps(config))
    return LLM(str(path), backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256)


def test_eos_and_min_tokens_and_ignore_eos(eos_model):
    greedy = dict(temperature=0, max_tokens=8)
    out = run(eos_model, [PROMPTS[2]], SamplingParams(**greedy))[0]
    assert out["token_ids"] == [164] and out["finish_reason"] == "stop" and out["text"] == ""
    out = run(eos_model, [PROMPTS[2]], SamplingParams(**greedy, min_tokens=3))[0]
    assert 164 not in out["token_ids"][:3] and len(out["token_ids"]) >= 4
    assert out["finish_reason"] == ("stop" if out["token_ids"][-1] == 164 else "length")
    out = run(eos_model, [PROMPTS[2]], SamplingParams(**greedy, ignore_eos=True))[0]
    assert out["token_ids"] == [164] * 8 and out["finish_reason"] == "length"


def test_finish_reason_length_at_max_model_len(tiny_qwen3):
    small = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=16, max_model_len=20)
    out = run(small, [list(range(3, 18))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5


def test_logprobs_equal_log_softmax_of_hf_logits_for_greedy(llm, tiny_qwen3):
    hf = load_hf(tiny_qwen3)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    outs = run(llm, prompts + [PROMPTS[2]], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=4)]
               * 2 + [SamplingParams(temperature=0, max_tokens=3)])
    assert outs[2]["logprobs"] is None
    for prompt, out in zip(prompts, outs):
        assert len(out["logprobs"]) == 3
        for k, (token, step) in enumerate(zip(out["token_ids"], out["logprobs"])):
            ref = hf_last_logits(hf, prompt + out["token_ids"][:k]).log_softmax(-1)
            top = ref.topk(4)
            assert list(step) == top.indices.tolist() and token == top.indices[0].item()
            torch.testing.assert_close(torch.tensor(list(step.values())), top.values, atol=1e-4, rtol=1e-4)


def test_logprobs_of_sampled_tokens_are_raw_model_logprobs(llm):
    """Temperature and top-k shape the sampling, not the reported log-probabilities."""
    full = run(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=1, logprobs=512))[0]["logprobs"][0]
    assert len(full) == 512 and math.isclose(sum(math.exp(v) for v in full.values()), 1, rel_tol=1e-4)
    out = run(llm, [PROMPTS[0]], SamplingParams(temperature=0.5, top_k=20, seed=11, max_tokens=4, logprobs=0))[0]
    assert [list(step) for step in out["logprobs"]] == [[t] for t in out["token_ids"]]
    first = out["token_ids"][0]
    assert out["logprobs"][0][first] == pytest.approx(full[first], abs=1e-5)


def test_logprobs_read_as_vllms_logprob_objects(llm):
    """Each entry is a float and vLLM's Logprob: `.logprob`, `.rank` (the top N are 1..N; a sampled token outside
    them has its rank in the whole vocabulary, the tokens at least as likely), `.decoded_token`; it pickles and
    serialises to JSON as the float. Prompt logprobs carry ranks too."""
    import pickle

    from nanovllm import Logprob
    full = run(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=1, logprobs=512))[0]["logprobs"][0]
    assert [lp.rank for lp in full.values()] == list(range(1, 513))
    ranked = sorted(full, key=full.get, reverse=True)
    for seed in range(4):
        out = run(llm, [PROMPTS[0]], SamplingParams(temperature=2.0, seed=seed, max_tokens=1, logprobs=0))[0]
        (token, lp), = out["logprobs"][0].items()
        assert isinstance(lp, Logprob) and lp.logprob == float(lp) == pytest.approx(full[token], abs=1e-5)
        assert lp.rank == ranked.index(token) + 1 and lp.decoded_token is None
    assert pickle.loads(pickle.dumps(lp)).rank == lp.rank and json.loads(json.dumps({"x": lp}))["x"] == float(lp)
    out = run(llm, [PROMPTS[1]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    for token, step in zip(out["prompt_token_ids"][1:], out["prompt_logprobs"][1:]):
        top = list(step)[:2]
        assert [step[t].rank for t in top] == [1, 2]
        assert step[token].rank == top.index(token) + 1 if token in top else step[token].rank > 2


def test_vocabulary_bounded_params_are_checked(llm):
    with pytest.raises(ValueError, match="logprobs=100000 is invalid"):
        run(llm, PROMPTS, SamplingParams(logprobs=100_000))
    with pytest.raises(ValueError, match="stop_token_ids has 9999"):
        run(llm, PROMPTS, [SamplingParams(), SamplingParams(stop_token_ids=[9999]), SamplingParams()])
    assert not llm.engine.has_unfinished(), "a bad request in a list must not leave the others queued"
