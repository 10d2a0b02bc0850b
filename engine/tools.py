"""Tool calls: the syntax a model writes them in, the grammar that holds it to it, the prompt.

Every model writes a call the same way, the convention most open models with
tool support were trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, after any text. A chat template that knows about tools
(it mentions ``tools``) gets them as the ``tools`` variable, and the turns'
``tool_calls`` and ``tool`` messages in the Hugging Face layout, and renders
them its own way. For a template that does not, :func:`generic_messages`
rewrites the conversation into plain turns: the tools described in the
system message (with the syntax above), past calls written back into the
assistant's text, and tool results as user turns in ``<tool_response>``.

What the model may write is held by a grammar (:func:`tool_grammar`, in
llguidance's Lark dialect): with ``auto`` the answer is free text until the
model writes ``<tool_call>``, and from there on a JSON object whose ``name``
is one of the tools and whose ``arguments`` match that tool's JSON Schema (a
lazily triggered grammar); ``required`` starts with a call, a named tool
allows only that one, ``none`` gives no grammar and no tools. So a call always
parses, and its arguments always validate against the schema the client sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.guidance import closed_objects
from engine.requests import ChatMessage, ToolFunction
from protocol.errors import BadRequest

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "generic_messages",
    "template_knows_tools",
    "tool_grammar",
    "tools_for_template",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128
MAX_SCHEMA_CHARS = 64 * 1024


def _schema(tool: ToolFunction) -> dict[str, Any]:
    if not tool.parameters:
        return {"type": "object"}
    if len(tool.parameters) > MAX_SCHEMA_CHARS:
        raise BadRequest(f"the parameters of tool {tool.name!r} are over {MAX_SCHEMA_CHARS} chars")
    try:
        schema = json.loads(tool.parameters)
    except ValueError as exc:
        raise BadRequest(f"the parameters of tool {tool.name!r} are not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise BadRequest(f"the parameters of tool {tool.name!r} must be a JSON Schema object")
    return schema


def check_tools(tools: Sequence[ToolFunction], name: str | None = None) -> None:
    """Refuse duplicate or too many tools, bad schemas, and a choice naming no tool."""
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"at most {MAX_TOOLS} tools")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise BadRequest("tool names must be unique")
    for tool in tools:
        _schema(tool)
    if name is not None and name not in names:
        raise BadRequest(f"tool_choice names {name!r}, which is not one of the tools")


def tool_grammar(
    tools: Sequence[ToolFunction], choice: str, name: str | None = None, parallel: bool = True
) -> str | None:
    """The Lark grammar (llguidance dialect) for an answer with these tools; None for ``none``.

    ``choice`` is ``auto``, ``required`` or ``none``; ``name`` (one tool's name)
    forces a call of that tool. ``parallel=False`` allows one call at most.
    Whitespace inside the JSON is fixed, and between calls at most a few
    characters: a small model allowed free whitespace can spend its budget on it.
    """
    if choice == "none" or not tools:
        return None
    check_tools(tools, name)
    chosen = [t for t in tools if name is None or t.name == name]
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": closed_objects(_schema(t))},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in chosen
        ],
        "x-guidance": {"whitespace_flexible": False},
    }
    more = "(GAP next_call)* GAP?" if parallel else "GAP?"
    lines = [
        "%llguidance {}",
        f'next_call: "{CALL_OPEN}" "\\n"? call "\\n"? "{CALL_CLOSE}"',
        "GAP: /[ \\t\\n]{1,4}/",
        f"call: %json {json.dumps(call)}",
    ]
    if choice == "auto" and name is None:
        lines += [
            f"start: TEXT | first_call {more}",
            "TEXT: /(.|\\n)*/",
            f'head[lazy]: TEXT "{CALL_OPEN}"',
            f'first_call: head "\\n"? call "\\n"? "{CALL_CLOSE}"',
        ]
    else:
        lines.append(f"start: next_call {more}")
    return "\n".join(lines) + "\n"


def template_knows_tools(template: str | None) -> bool:
    """True if the chat template renders tools itself (Hugging Face templates take ``tools``)."""
    return template is not None and "tools" in template


def tools_for_template(tools: Sequence[ToolFunction]) -> list[dict[str, Any]]:
    """Tools in the layout chat templates expect (OpenAI's ``{"type": "function", ...}``)."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": _schema(t)},
        }
        for t in tools
    ]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_message(m: ChatMessage) -> dict[str, Any]:
    """One turn as a chat template that knows tools expects it (arguments as objects)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _system_block(tools: Sequence[ToolFunction]) -> str:
    listed = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools_for_template(tools))
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        f"within {CALL_OPEN}{CALL_CLOSE} XML tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def _call_text(m: ChatMessage) -> str:
    parts = [m.content] if m.content else []
    for c in m.tool_calls or ():
        body = json.dumps({"name": c.name, "arguments": _arguments(c.arguments)})
        parts.append(f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
    return "\n".join(parts)


def generic_messages(
    messages: Sequence[ChatMessage], tools: Sequence[ToolFunction] | None
) -> list[ChatMessage]:
    """The conversation as plain turns, for a chat template that knows nothing of tools.

    The tools go into the system message (a new one first if there is none);
    an assistant turn's calls are written into its text as the model would
    have written them; consecutive ``tool`` results become one user turn of
    ``<tool_response>`` blocks.
    """
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = ChatMessage("user", out[-1].content + "\n" + block)
            else:
                out.append(ChatMessage("user", block))
        elif m.tool_calls:
            out.append(ChatMessage(m.role, _call_text(m)))
        else:
            out.append(ChatMessage(m.role, m.content))
    if tools:
        block = _system_block(tools)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{block}")
        else:
            out.insert(0, ChatMessage("system", block))
    return out
