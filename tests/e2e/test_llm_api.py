"""LLM.stream, LLM.chat and `nanovllm generate`: streamed pieces add up to generate's outputs."""
import argparse

import pytest

from nanovllm import LLM, CompletionOutput, RequestOutput, SamplingParams
from nanovllm.cli import main

PROMPTS = ["paris is the capital of", "hello world", "the quick"]


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=128, max_model_len=256)


def mixed_params(llm):
    """Greedy, seeded sampling with a stop string taken from its own output, and seeded sampling with logprobs."""
    seeded = dict(temperature=1.0, seed=21, max_tokens=12, ignore_eos=True)
    text = llm.generate([PROMPTS[1]], SamplingParams(**seeded), use_tqdm=False)[0]["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text)) if "\ufffd" not in text[i:i + 2])
    return [SamplingParams(temperature=0, max_tokens=10), SamplingParams(**seeded, stop=stop),
            SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=9, logprobs=2)]


def collect(pieces, n):
    out = [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None, "num_finished": 0} for _ in range(n)]
    for piece in pieces:
        o = out[piece.index]
        assert o["num_finished"] == 0, "a piece after the finished one"
        o["text"] += piece.text
        o["token_ids"] += piece.token_ids
        o["logprobs"] += piece.logprobs or []
        o["num_finished"] += piece.finished
        o["finish_reason"] = piece.finish_reason
    return out


def test_stream_concatenation_equals_generate(llm):
    params = mixed_params(llm)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    assert expected[1]["finish_reason"] == "stop", "the stop string should end request 1"
    streamed = collect(llm.stream(PROMPTS, params), len(PROMPTS))
    for e, s in zip(expected, streamed):
        assert (s["text"], s["token_ids"], s["finish_reason"], s["num_finished"]) == \
               (e["text"], e["token_ids"], e["finish_reason"], 1)
        assert s["logprobs"] == (e["logprobs"] or [])


def test_stream_stopped_early_frees_its_requests(llm):
    pieces = llm.stream(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    first = next(pieces)
    assert first.token_ids and not first.finished
    pieces.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.scheduler.block_manager.num_free_blocks == 128


def test_stream_checks_its_arguments_at_once(llm):
    with pytest.raises(ValueError, match="sampling params"):
        llm.stream(PROMPTS, [SamplingParams()])
    assert not llm.engine.has_unfinished()


def test_chat_applies_the_template(llm):
    conversation = [{"role": "user", "content": "hello"}]
    params = SamplingParams(temperature=0, max_tokens=5)
    out = llm.chat(conversation, params, use_tqdm=False)
    text = llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    prompt_ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert out[0]["prompt_token_ids"] == prompt_ids
    assert out[0]["token_ids"] == llm.generate([prompt_ids], params, use_tqdm=False)[0]["token_ids"]
    two = llm.chat([conversation, conversation + [{"role": "assistant", "content": "hi"}]], params, use_tqdm=False)
    assert len(two) == 2 and two[0] == out[0] and len(two[1]["prompt_token_ids"]) > len(prompt_ids)


@pytest.mark.parametrize("messages", [[], 3, [{"role": "user"}], [[{"role": "user", "content": 3}]]])
def test_chat_rejects_malformed_messages(llm, messages):
    with pytest.raises(ValueError, match="messages must be a conversation"):
        llm.chat(messages)


def test_cli_generate_stream_prints_the_same_text(tiny_qwen3, capsys):
    args = ["generate", "--model", tiny_qwen3, "--backend", "cpu_ref", "--max-tokens", "6", "--temperature", "0.9",
            "--top-p", "0.95", "--top-k", "50", "--seed", "3", "--num-kvcache-blocks", "64", "--max-model-len", "256",
            "hello", "paris"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith("--- 'hello'\n")
    assert main(args[:-2] + ["--max-tokens", "2", "--chat", "--stream", "hello", "paris"]) == 0
    assert capsys.readouterr().out.count("--- ") == 2


def test_cli_reports_invalid_sampling_values(capsys):
    assert main(["generate", "--top-p", "1.5", "hi"]) == 2
    assert "SamplingParams.top_p=1.5 is invalid" in capsys.readouterr().err


def test_vllm_prompt_dicts_are_accepted(llm):
    """vLLM's prompt forms, {"prompt": text} (TextPrompt) and {"prompt_token_ids": ids} (TokensPrompt), alone or in
    a list, give what the plain text / ids give; a dict with neither, both or other keys names the problem."""
    greedy = SamplingParams(temperature=0, max_tokens=4)
    ids = llm.tokenizer.encode(PROMPTS[0])
    expected = [o["token_ids"] for o in llm.generate([PROMPTS[0], ids, PROMPTS[1]], greedy, use_tqdm=False)]
    dicts = [{"prompt": PROMPTS[0]}, {"prompt_token_ids": ids}, PROMPTS[1]]
    assert [o["token_ids"] for o in llm.generate(dicts, greedy, use_tqdm=False)] == expected
    assert llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0]["token_ids"] == expected[1]
    assert "".join(p.text for p in llm.stream({"prompt": PROMPTS[0]}, greedy)) == llm.tokenizer.decode(expected[0])
    for bad, match in (({}, "prompt or prompt_token_ids"), ({"prompt": "a", "prompt_token_ids": [1]}, "both"),
                       ({"prompt": "a", "multi_modal_data": {}}, "multi_modal_data"),
                       ({"prompt_token_ids": "a"}, r"prompts\[1\]")):
        with pytest.raises(ValueError, match=match):
            llm.generate(["x", bad], greedy, use_tqdm=False)


def test_get_tokenizer_as_in_vllm(llm):
    """vLLM scripts build prompts with llm.get_tokenizer() (AsyncLLM: await engine.get_tokenizer())."""
    import asyncio

    from nanovllm import AsyncLLM
    assert llm.get_tokenizer() is llm.tokenizer
    assert asyncio.run(AsyncLLM(llm=llm).get_tokenizer()) is llm.tokenizer


def test_outputs_read_as_vllm_request_outputs_and_as_dicts(llm):
    """vLLM's quickstart loop (`output.prompt`, `output.outputs[0].text`) works on generate's results, which stay
    the dicts nano-vllm returns; stop_reason is vLLM's: the stop string or stop token id, None for EOS/length."""
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)[0]
    stop_id = greedy["token_ids"][3]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id]),
              SamplingParams(temperature=1.0, seed=3, max_tokens=6, n=2)]
    outs = llm.generate([PROMPTS[0], {"prompt": PROMPTS[0]}, {"prompt_token_ids": greedy["prompt_token_ids"]}],
                        params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].text == out["text"] == out["outputs"][0]["text"]
        assert out.prompt_token_ids == greedy["prompt_token_ids"] and out.finished is True
        assert isinstance(out, RequestOutput) and isinstance(out.outputs[0], CompletionOutput)
        assert isinstance(out.request_id, str) and "request_id" not in out
    assert [o.prompt for o in outs] == [PROMPTS[0], PROMPTS[0], None]
    assert outs[0] == greedy and outs[0].request_id != greedy.request_id  # equal requests, equal outputs
    prompt = list(range(100, 140))  # 40 tokens: full KV blocks for the prefix cache
    first, again = (llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0] for _ in range(2))
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)  # two 16-token blocks served the second
    assert (outs[0].outputs[0].finish_reason, outs[0].outputs[0].stop_reason) == ("length", None)
    first = greedy["token_ids"].index(stop_id)
    assert outs[1].outputs[0].token_ids == greedy["token_ids"][:first + 1]
    assert (outs[1].finish_reason, outs[1].stop_reason) == ("stop", stop_id)
    assert [s.index for s in outs[2].outputs] == [0, 1]
    with pytest.raises(AttributeError, match="no attribute or key 'nope'"):
        outs[0].nope
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                      stop=greedy["text"][2:5]), use_tqdm=False)[0]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", greedy["text"][2:5])
    eos = llm.tokenizer.eos_token_id
    for listed in ([], [eos]):  # EOS, also when listed in stop_token_ids: no stop_reason (vLLM checks EOS first)
        ended = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0},
                                                        stop_token_ids=listed), use_tqdm=False)[0]
        assert (ended.token_ids, ended.finish_reason, ended.stop_reason) == ([eos], "stop", None)
    ignored = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0},
                                                      stop_token_ids=[eos], ignore_eos=True), use_tqdm=False)[0]
    assert (ignored.token_ids, ignored.stop_reason) == ([eos], eos)  # with ignore_eos only the listed id stops it
    assert ignored.text == "" and ignored.outputs[0].finished()
    # vLLM code assigns through attributes and copies: both keep the dict and its type in step
    copied = ignored.copy()
    copied.outputs[0].text = "edited"
    assert type(copied) is RequestOutput and copied.request_id == ignored.request_id
    assert copied["outputs"][0]["text"] == "edited" == ignored.outputs[0].text  # a shallow copy, as dict.copy
    with pytest.raises(AttributeError, match="no key 'nope' to assign"):
        copied.nope = 1
    import pickle  # results cross processes (multiprocessing, Ray) with any pickle protocol, 0 and 1 included
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(ignored, protocol=protocol))
        assert back == ignored and type(back) is RequestOutput and type(back.outputs[0]) is CompletionOutput
        assert (back.request_id, back.num_cached_tokens, back.metrics) == (
            ignored.request_id, ignored.num_cached_tokens, ignored.metrics)


def test_outputs_carry_their_times(llm):
    """RequestOutput.metrics: one arrival for the call, then each request's first token and end in that order (a
    request of n samples included); streamed pieces carry their sample's first-token time."""
    import time
    before = time.monotonic()
    outs = llm.generate(PROMPTS + [PROMPTS[0]], [SamplingParams(max_tokens=m, ignore_eos=True) for m in (2, 9, 5)] +
                        [SamplingParams(max_tokens=4, n=3, seed=1, ignore_eos=True)], use_tqdm=False)
    after = time.monotonic()
    assert len({o.metrics.arrival_time for o in outs}) == 1
    for o in outs:
        m = o.metrics
        assert before <= m.arrival_time < m.first_token_time <= m.finished_time <= after
    assert outs[0].metrics.finished_time < outs[1].metrics.finished_time  # 2 tokens end before 9
    streamed = [p.first_token_time for p in llm.stream(PROMPTS[:1], SamplingParams(max_tokens=3, ignore_eos=True))]
    assert len(streamed) >= 2 and len(set(streamed)) == 1 and streamed[0] is not None


def test_chat_outputs_carry_the_rendered_prompt(llm):
    conversation = [{"role": "user", "content": "hello"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert out.prompt == llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert llm.tokenizer.encode(out.prompt, add_special_tokens=False) == out.prompt_token_ids


def test_stop_strings_and_special_tokens_kept_on_request(llm):
    """vLLM's include_stop_str_in_output keeps the stop string (or stop token's text) in the text, streamed or not;
    skip_special_tokens=False keeps special tokens' text."""
    base = dict(temperature=0, max_tokens=8, ignore_eos=True)
    greedy = llm.generate(PROMPTS[0], SamplingParams(**base), use_tqdm=False)[0]
    stop = greedy.text[2:5]
    kept = SamplingParams(**base, stop=stop, include_stop_str_in_output=True)
    out = llm.generate(PROMPTS[0], kept, use_tqdm=False)[0]
    assert out.text == greedy.text[:greedy.text.index(stop) + len(stop)] and out.stop_reason == stop
    assert "".join(p.text for p in llm.stream([PROMPTS[0]], kept)) == out.text
    stop_id = greedy.token_ids[3]
    end = greedy.token_ids.index(stop_id) + 1
    by_id = llm.generate(PROMPTS[0], SamplingParams(**base, stop_token_ids=[stop_id], include_stop_str_in_output=True),
                         use_tqdm=False)[0]
    assert by_id.token_ids == greedy.token_ids[:end]
    decode = llm.tokenizer.decode
    assert by_id.text == decode(greedy.token_ids[:end]) != decode(greedy.token_ids[:end - 1])
    eos = llm.tokenizer.eos_token_id
    forced = dict(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={eos: 100.0})
    special = llm.generate([PROMPTS[0]] * 2, [SamplingParams(**forced),
                                              SamplingParams(**forced, skip_special_tokens=False)], use_tqdm=False)
    assert special[0].text == "" and special[1].text == llm.tokenizer.eos_token * 3
    with pytest.raises(ValueError, match="include_stop_str_in_output=1 is invalid"):
        SamplingParams(include_stop_str_in_output=1)


def test_truncate_prompt_tokens_keeps_the_prompts_end(llm):
    """vLLM's truncate_prompt_tokens: the last k prompt tokens, applied before the max_model_len check; the output
    equals generating from those k tokens, and prompt_token_ids shows what was kept."""
    long_prompt = [(7 * i) % 500 + 1 for i in range(300)]  # longer than max_model_len=256
    with pytest.raises(ValueError, match="truncate_prompt_tokens=k"):
        llm.generate([long_prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=40)
    got = llm.generate([long_prompt, PROMPTS[0]], params, use_tqdm=False)
    want = llm.generate([long_prompt[-40:]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert got[0].prompt_token_ids == long_prompt[-40:] and got[0].token_ids == want.token_ids
    short = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert got[1].prompt_token_ids == short.prompt_token_ids  # shorter than k: unchanged
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)


def test_detokenize_false_returns_token_ids_only(llm):
    """vLLM's detokenize=False: the same tokens, no text (generate and stream); stop strings need the text."""
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids_only = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False)
    want = llm.generate(PROMPTS, plain, use_tqdm=False)
    got = llm.generate(PROMPTS, ids_only, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want] and all(o.text == "" for o in got)
    assert any(o.text for o in want)
    pieces = list(llm.stream(PROMPTS, ids_only))
    assert all(p.text == "" for p in pieces)
    assert [o["token_ids"] for o in collect(pieces, len(PROMPTS))] == [o.token_ids for o in want]
    with pytest.raises(ValueError, match="stop needs detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(detokenize="no")


def test_reset_prefix_cache(llm):
    """vLLM's reset_prefix_cache: cached prefixes are forgotten (the next request computes its whole prompt, to the
    same tokens); while a paused stream holds blocks it refuses and changes nothing."""
    prompt = list(range(200, 240))  # 40 tokens: two full 16-token blocks
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first, cached = (llm.generate([prompt], greedy, use_tqdm=False)[0] for _ in range(2))
    assert cached.num_cached_tokens == 32
    assert llm.reset_prefix_cache() is True
    cold = llm.generate([prompt], greedy, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0 and cold["token_ids"] == first["token_ids"]
    stream = llm.stream([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    next(stream)  # the request holds its blocks while the stream is paused
    assert llm.reset_prefix_cache() is False
    stream.close()
    assert llm.generate([prompt], greedy, use_tqdm=False)[0].num_cached_tokens == 32  # nothing was reset
    llm.loop.run(lambda engine: engine.scheduler.block_manager.check_invariants([]))


def test_prefix_caching_can_be_turned_off(tiny_qwen3):
    """vLLM's enable_prefix_caching=False (--no-enable-prefix-caching): no request ever hits, every prompt is
    computed in full, to the same tokens; n > 1 samples then compute their prompts each."""
    from nanovllm.commands.arguments import add_engine_arguments, engine_options
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=128, enable_prefix_caching=False)
    prompt = list(range(200, 240))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first, again = (llm.generate([prompt], greedy, use_tqdm=False)[0] for _ in range(2))
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 0) and again["token_ids"] == first["token_ids"]
    cached = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=128)
    assert cached.generate([prompt], greedy, use_tqdm=False)[0]["token_ids"] == first["token_ids"]
    samples = SamplingParams(temperature=1.0, seed=5, max_tokens=5, n=3)
    assert llm.generate([prompt], samples, use_tqdm=False)[0].outputs == \
        cached.generate([prompt], samples, use_tqdm=False)[0].outputs
    llm.loop.run(lambda engine: engine.scheduler.block_manager.check_invariants([]))
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_options(parser.parse_args(["--no-enable-prefix-caching"]))["enable_prefix_caching"] is False
    assert "enable_prefix_caching" not in engine_options(parser.parse_args([]))
