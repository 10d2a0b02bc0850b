"""Rendering chat messages into a prompt with the model's own template.

GGUF files carry a Jinja2 chat template under ``tokenizer.chat_template``.
It is rendered in a sandbox (templates come with downloaded files and must
not reach Python objects), with the variables Hugging Face templates expect:
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and a
``raise_exception`` helper.

A template is code from whoever wrote the model file or the Modelfile, so one
render is bounded (:class:`TemplateLimits`): lines of template code executed
(counted by a trace function that follows only the template's own frames, so
nested loops of any kind count), wall time, output size, and the size of any
string or list made by ``*`` or ``range``. Past a limit the render fails with
``BadRequest``; no single template can hold a worker or the gateway.
"""

from __future__ import annotations

import operator
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

import jinja2
import msgspec
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.requests import ChatMessage, ToolFunction
from engine.tools import (
    generic_messages,
    template_knows_tools,
    template_message,
    tools_for_template,
)
from protocol.errors import BadRequest

__all__ = ["PLAIN_TEMPLATE", "TemplateLimits", "check_template", "render_chat"]

# For models without a template: readable, and the trailing "assistant:" cues an answer.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateLimits(msgspec.Struct, frozen=True):
    """What one render of a template may cost."""

    steps: int = 2_000_000  # lines of template code executed
    seconds: float = 2.0
    output_chars: int = 64 * 1024 * 1024
    sequence_len: int = 1_000_000  # longest string or list made by ``*``, longest range()


DEFAULT_LIMITS = TemplateLimits()
_TEMPLATE_FILE = "<template>"  # the file name Jinja compiles from_string templates under
_CHECK_EVERY = 4096  # steps between clock reads


class _TooExpensive(Exception):
    """A render went past one of its limits (raised inside the template's frames)."""


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with ``*``, ``**`` and ``range`` capped in size."""

    intercepted_binops = frozenset({"*", "**"})
    limits = DEFAULT_LIMITS

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.globals["range"] = self._range

    def _range(self, *args: int) -> range:
        r = range(*args)
        if len(r) > self.limits.sequence_len:
            raise _TooExpensive(f"range() of {len(r)} items")
        return r

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
                if sized and len(seq) * n > self.limits.sequence_len:
                    raise _TooExpensive(f"a repetition of {len(seq) * n} items")
            return operator.mul(left, right)
        if op == "**":
            if isinstance(right, int) and abs(right) > 1024:
                raise _TooExpensive("a power over 1024")
            return operator.pow(left, right)
        return super().call_binop(context, op, left, right)


def _run_bounded(fn: Callable[[], str], limits: TemplateLimits) -> str:
    """Run ``fn`` (a render) under ``limits``; the trace follows template frames only."""
    steps = limits.steps
    deadline = time.perf_counter() + limits.seconds

    def local(frame: FrameType, event: str, arg: object) -> object:
        nonlocal steps
        if event == "line":
            steps -= 1
            if steps <= 0:
                raise _TooExpensive(f"more than {limits.steps} steps")
            if steps % _CHECK_EVERY == 0 and time.perf_counter() > deadline:
                raise _TooExpensive(f"more than {limits.seconds:g} s")
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(tracer)  # type: ignore[arg-type]
    try:
        return fn()
    finally:
        sys.settrace(previous)


_env = _LimitedSandbox()
_compiled: dict[str, jinja2.Template] = {}
COMPILED_CACHE = 32


def _raise(message: str) -> NoReturn:
    raise BadRequest(f"chat template rejected the conversation: {message}")


def _compile(source: str) -> jinja2.Template:
    compiled = _compiled.get(source)
    if compiled is None:
        try:
            compiled = _env.from_string(source)
        except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
            raise BadRequest(f"the chat template is invalid: {exc}") from None
        _compiled[source] = compiled
        while len(_compiled) > COMPILED_CACHE:  # templates come from users: keep a few
            _compiled.pop(next(iter(_compiled)))
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
    tools: Sequence[ToolFunction] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    limits: TemplateLimits = DEFAULT_LIMITS,
) -> str:
    """Render ``messages`` with ``template`` (or :data:`PLAIN_TEMPLATE`) within ``limits``.

    With ``tools`` (or tool calls and results in the conversation), a template
    that knows tools gets them its way; any other gets the conversation in
    :func:`engine.tools.generic_messages`' plain form.
    """
    compiled = _compile(template or PLAIN_TEMPLATE)
    uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
    turns: list[dict[str, Any]]
    if uses_tools and template_knows_tools(template):
        turns = [template_message(m) for m in messages]
    elif uses_tools:
        turns = [{"role": m.role, "content": m.content} for m in generic_messages(messages, tools)]
    else:
        turns = [{"role": m.role, "content": m.content} for m in messages]
    variables = {
        "messages": turns,
        "tools": tools_for_template(tools) if tools and template_knows_tools(template) else None,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "raise_exception": _raise,
    }

    def render() -> str:
        out: list[str] = []
        size = 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > limits.output_chars:
                raise _TooExpensive(f"more than {limits.output_chars} characters of output")
            out.append(piece)
        return "".join(out)

    try:
        return _run_bounded(render, limits)
    except _TooExpensive as exc:
        raise BadRequest(f"chat template is too expensive to render: {exc}") from None
    except RecursionError:
        raise BadRequest("chat template recurses too deeply") from None
    except jinja2.TemplateError as exc:
        raise BadRequest(f"chat template failed: {exc}") from None
