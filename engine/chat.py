"""Rendering chat messages into a prompt with the model's own template.

GGUF files carry a Jinja2 chat template under ``tokenizer.chat_template``.
It is rendered in a sandbox (templates come with downloaded files and must
not reach Python objects), with the variables Hugging Face templates expect:
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and a
``raise_exception`` helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.requests import ChatMessage
from protocol.errors import BadRequest

__all__ = ["PLAIN_TEMPLATE", "check_template", "render_chat"]

# For models without a template: readable, and the trailing "assistant:" cues an answer.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_compiled: dict[str, jinja2.Template] = {}


def _raise(message: str) -> NoReturn:
    raise BadRequest(f"chat template rejected the conversation: {message}")


def _compile(source: str) -> jinja2.Template:
    compiled = _compiled.get(source)
    if compiled is None:
        try:
            compiled = _env.from_string(source)
        except jinja2.TemplateError as exc:
            raise BadRequest(f"the chat template is invalid: {exc}") from None
        _compiled[source] = compiled
    return compiled


def check_template(template: str) -> None:
    """Raise BadRequest unless ``template`` is a Jinja2 chat template that renders a turn.

    Modelfiles written for Ollama carry Go templates (``{{ .Prompt }}``); those
    are refused with a message that says which syntax is expected.
    """
    if "{{ ." in template or "{{- ." in template or "{{." in template:
        raise BadRequest(
            "TEMPLATE must be a Jinja2 chat template (the tokenizer.chat_template syntax, "
            "e.g. {% for message in messages %}…); Go templates ({{ .Prompt }}) are not supported"
        )
    render_chat(template, [ChatMessage("user", "hi")])


def render_chat(
    template: str | None,
    messages: Sequence[ChatMessage],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` with ``template`` (or :data:`PLAIN_TEMPLATE`)."""
    compiled = _compile(template or PLAIN_TEMPLATE)
    try:
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            raise_exception=_raise,
        )
    except jinja2.TemplateError as exc:
        raise BadRequest(f"chat template failed: {exc}") from None
