"""LLM.chat: conversations go through the tokenizer's chat template, ending with the assistant's turn."""
import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256)


def test_chat_prompt_applies_the_template(llm):
    ids = llm.chat_prompt("hello world")
    assert llm.tokenizer.decode(ids) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert llm.chat_prompt([{"role": "user", "content": "hello world"}]) == ids


def test_chat_equals_generate_on_the_templated_prompt(llm):
    conversations = ["hello world", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "paris?"}]]
    chats = llm.chat(conversations, GREEDY, use_tqdm=False)
    plain = llm.generate([llm.chat_prompt(c) for c in conversations], GREEDY, use_tqdm=False)
    assert [c["token_ids"] for c in chats] == [p["token_ids"] for p in plain]
    assert llm.chat("hello world", GREEDY, use_tqdm=False)[0]["token_ids"] == chats[0]["token_ids"]


def test_chat_without_a_template_is_refused(llm, monkeypatch):
    monkeypatch.setattr(llm.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="has no chat template"):
        llm.chat_prompt("hello")


def test_chat_with_a_given_chat_template(llm):
    """vLLM's LLM.chat(chat_template=...): the template string replaces the tokenizer's; a broken one is a
    ValueError naming it, before any work."""
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    out = llm.chat("hello", GREEDY, use_tqdm=False, chat_template=template)[0]
    assert out["prompt"] == "<user>hello<assistant>"
    assert out["prompt_token_ids"] == llm.tokenizer.encode("<user>hello<assistant>", add_special_tokens=False)
    assert llm.apply_chat_template("hello", add_generation_prompt=False, chat_template=template)[0] == \
        llm.tokenizer.encode("<user>hello", add_special_tokens=False)
    looped = "{% for m in messages %}{{ m['content'] }}{% if loop.first %}{% break %}{% endif %}{% endfor %}"
    assert llm.apply_chat_template("a", chat_template=looped)[0] == llm.tokenizer.encode(
        "a", add_special_tokens=False)  # jinja's loop controls, as apply_chat_template compiles templates
    with pytest.raises(ValueError, match="chat_template is not a valid Jinja template"):
        llm.chat("hello", GREEDY, chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="the given chat_template refused the conversation: no"):
        llm.chat("hello", GREEDY, chat_template="{{ raise_exception('no') }}")


def test_chat_takes_vllms_template_options_and_text_parts(llm):
    """vLLM's LLM.chat keywords: add_generation_prompt, continue_final_message, chat_template_kwargs (the
    template's variables, which win); OpenAI-style text content parts are joined."""
    decode = llm.tokenizer.decode
    assert decode(llm.apply_chat_template("hi", add_generation_prompt=False)[0]) == "<|im_start|>user\nhi<|im_end|>\n"
    continued = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the capital"}]
    ids = llm.apply_chat_template(continued, add_generation_prompt=False, continue_final_message=True)[0]
    assert decode(ids).endswith("<|im_start|>assistant\nthe capital")
    out = llm.chat(continued, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert out[0]["prompt_token_ids"] == ids
    assert llm.apply_chat_template("hi", add_generation_prompt=False,
                                   chat_template_kwargs={"add_generation_prompt": True}) == [llm.chat_prompt("hi")]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    assert llm.chat_prompt(parts) == llm.chat_prompt("hello world")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.apply_chat_template(continued, continue_final_message=True)  # add_generation_prompt is True
    with pytest.raises(ValueError, match="tokenize"):
        llm.apply_chat_template("hi", chat_template_kwargs={"tokenize": True})
    with pytest.raises(ValueError, match="image_url"):
        llm.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_a_template_that_refuses_the_conversation_is_a_value_error(llm, monkeypatch):
    """Many models' templates (Llama 2, Mistral, Gemma) raise_exception() on roles that do not alternate: a jinja2
    TemplateError, which reached users as itself (an HTTP 500 on the server) instead of a ValueError."""
    strict = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(llm.tokenizer, "chat_template", strict)
    assert llm.chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="chat template.*roles must alternate"):
        llm.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], GREEDY, use_tqdm=False)
