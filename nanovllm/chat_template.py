"""What LLM.chat and the server's chat endpoint hand to a tokenizer's chat template (vLLM's template options and
OpenAI-style message contents, checked before the template runs) and the template call itself: every problem a
ValueError naming it."""
import os

from nanovllm.text import check_text

# apply_chat_template's own arguments, which chat_template_kwargs (the template's variables) may not set
RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "chat_template", "tools", "documents", "return_dict",
                            "return_tensors", "return_assistant_tokens_mask", "padding", "truncation", "max_length",
                            "tokenizer_kwargs"}


def template_kwargs(add_generation_prompt: bool = True, continue_final_message: bool = False,
                    chat_template_kwargs: dict | None = None) -> dict:
    """The template's variables: add_generation_prompt and continue_final_message, then chat_template_kwargs
    (which win, as in vLLM)."""
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ValueError(f"chat_template_kwargs must be a dict of the template's variables; got "
                         f"{type(chat_template_kwargs).__name__}")
    kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
              **(chat_template_kwargs or {})}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs sets {', '.join(reserved)}, an argument of the template call itself: "
                         f"give only the template's variables")
    if kwargs["add_generation_prompt"] and kwargs["continue_final_message"]:
        raise ValueError("continue_final_message=True continues the last message, add_generation_prompt=True starts "
                         "a new one: set add_generation_prompt=False")
    return kwargs


def content_text(where: str, content) -> str | None:
    """A message's content as one string: a string, or OpenAI's text parts ({"type": "text", "text": ...}) joined;
    None when it is neither (the caller says what a message is); ValueError for a part that is not text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        return None
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise ValueError(f"{where} has a part of type {part.get('type')!r}; nanovllm serves text models: give "
                             f"text parts only")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}, part {j}, is a text part without a `text` string: give its text")
        texts.append(part["text"])
    return "".join(texts)


def check_chat_template(template, name: str = "chat_template") -> str:
    """A chat template given by the caller (vLLM's `chat_template`): a Jinja template string that compiles;
    ValueError naming `name` otherwise."""
    from jinja2 import TemplateSyntaxError
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{name} must be a Jinja chat template as a non-empty string; got {template!r:.80}")
    check_text(name, template)
    try:  # compiled as apply_chat_template compiles it (its sandbox, loop controls, the `generation` tag)
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # a transformers without it: jinja's sandbox with the loop controls templates use
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        compile_template = ImmutableSandboxedEnvironment(extensions=[loopcontrols]).from_string
    try:
        compile_template(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"{name} is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return template


def load_chat_template(value: str) -> str:
    """`--chat-template`, as vLLM's: a file holding the template, or the template itself (a string with a Jinja
    `{`); ValueError for a path that does not exist."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return check_chat_template(f.read(), f"--chat-template file {value!r}")
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r}: no such file, and not a template (no Jinja '{{' in it)")
    return check_chat_template(value, "--chat-template")


def render(tokenizer, conversation: list[dict], kwargs: dict, chat_template: str | None = None) -> str:
    """The conversation through `chat_template` (checked with check_chat_template), else the tokenizer's chat
    template (kwargs from template_kwargs). A template that refuses it (many raise_exception() on roles that do
    not alternate) is a ValueError with its message; so is no template at all."""
    from jinja2 import TemplateError  # transformers' dependency, as the templates are jinja
    if chat_template is not None:
        check_chat_template(chat_template)
    elif getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model's tokenizer has no chat template: pass chat_template (a Jinja template), or "
                         "format the prompt yourself and use generate / the completions endpoint")
    whose = "the given chat_template" if chat_template is not None else "the model's chat template"
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template, **kwargs)
    except TemplateError as e:
        raise ValueError(f"{whose} refused the conversation: {e}") from None
