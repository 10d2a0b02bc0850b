"""Modelfiles: the Ollama-compatible recipe that turns a base model into a named model.

People already have Modelfiles written for Ollama, so ``ferrous create`` reads
the same format (the subset that makes sense here) and the store can write one
back out (``ferrous show --modelfile``). Every mistake is reported as a
:class:`~engine.store.errors.ModelfileError` carrying the 1-based line and the
directive, so a client can point at the exact spot.

Accepted syntax
---------------
One directive per logical line, ``DIRECTIVE arguments``; directive names are
case-insensitive. Blank lines and lines whose first non-blank character is
``#`` are ignored (there are no trailing comments: ``#`` later on a line is
part of the argument)::

    FROM <model reference, path or URL>      required; a second FROM adds a vision
                                             model's projector (GGUF, clip)
    PARAMETER <name> <value>                 name case-insensitive, see PARAMETERS
    TEMPLATE <text>                          at most once
    SYSTEM <text>                            at most once
    MESSAGE <system|user|assistant> <text>   repeatable, kept in order
    LICENSE <text>                           repeatable
    ADAPTER <path, URL or sha256:digest>     at most once: a GGUF LoRA (engine.store.adapters)

An argument (a value, or a MESSAGE's content) is one of:

* bare text: the rest of the line, with surrounding whitespace stripped;
* a double-quoted string ``"..."`` on one line, with the escapes ``\\"``
  ``\\\\`` ``\\n`` ``\\t`` ``\\r`` (any other backslash is kept as it is);
* a triple-quoted string ``\"\"\"...\"\"\"`` that may span lines; its content
  is taken verbatim, without escapes, and cannot contain ``\"\"\"``.

Nothing but whitespace may follow a closing quote. PARAMETER names and MESSAGE
roles are single words. Values are typed (see ``PARAMETERS``) and range-checked;
``stop`` may repeat and is collected into a list. Any other PARAMETER may be
given once. Line endings may be ``\\n`` or ``\\r\\n``.

:func:`render_modelfile` writes the canonical form, which parses back to an
equal :class:`Modelfile`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import TypeAlias

import msgspec

from engine.store.errors import ModelfileError

__all__ = [
    "LIST_PARAMETERS",
    "PARAMETERS",
    "ROLES",
    "Message",
    "Modelfile",
    "ParamValue",
    "parse_modelfile",
    "parse_parameter",
    "render_modelfile",
]

ParamValue: TypeAlias = int | float | str | bool

PARAMETERS: dict[str, type] = {
    "num_ctx": int,
    "num_predict": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "seed": int,
    "stop": str,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "num_keep": int,
    "typical_p": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "mirostat": int,
    "mirostat_tau": float,
    "mirostat_eta": float,
    "num_batch": int,
    "num_thread": int,
    "num_gpu": int,
    "penalize_newline": bool,
}
LIST_PARAMETERS = frozenset({"stop"})
ROLES = ("system", "user", "assistant")

_DIRECTIVES = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "ADAPTER")
_ONCE = frozenset({"TEMPLATE", "SYSTEM", "ADAPTER"})
_NEEDS = {
    "FROM": "a model name, path or URL",
    "PARAMETER": "a name and a value",
    "TEMPLATE": "a template",
    "SYSTEM": "a system message",
    "MESSAGE": "a role and content",
    "LICENSE": "license text",
    "ADAPTER": "a path",
}

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset({"true", "t", "1"})
_FALSE = frozenset({"false", "f", "0"})
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "min_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "typical_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "num_ctx": (lambda v: v >= 1, ">= 1"),
    "num_predict": (lambda v: v >= -2, ">= -2 (-1 means no limit)"),
    "repeat_penalty": (lambda v: v > 0, "> 0"),
}

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_TRIPLE = '"""'


class Message(msgspec.Struct, frozen=True):
    role: str  # "system" | "user" | "assistant"
    content: str


class Modelfile(msgspec.Struct, kw_only=True):
    from_: str  # the FROM argument: a model reference, a path or a URL
    parameters: dict[str, ParamValue | list[str]] = msgspec.field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[Message] = msgspec.field(default_factory=list)
    license: list[str] = msgspec.field(default_factory=list)
    adapter: str | None = None  # a GGUF LoRA over FROM (engine.store.adapters)
    projector: str | None = None  # a second FROM: a vision model's projector (GGUF, clip)


def _known_name(name: str) -> str:
    """The canonical (lower-case) parameter name; ValueError naming the closest known one."""
    key = name.strip().lower()
    if key in PARAMETERS:
        return key
    close = difflib.get_close_matches(key, PARAMETERS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(PARAMETERS)})"
    raise ValueError(f"unknown parameter {name!r}{hint}")


def parse_parameter(name: str, raw: str) -> ParamValue:
    """Parse one PARAMETER value to its type; ValueError says what is wrong, ready to show.

    ``name`` is case-insensitive. For ``stop`` this returns one string (the
    caller collects repeats into a list).
    """
    key = _known_name(name)
    kind = PARAMETERS[key]
    text = raw.strip()
    value: ParamValue
    if kind is str:
        if not raw:
            raise ValueError(f"PARAMETER {key} needs a non-empty string")
        return raw
    if kind is bool:
        word = text.lower()
        if word not in _TRUE | _FALSE:
            raise ValueError(f"PARAMETER {key} expects true or false, got {raw!r}")
        return word in _TRUE
    if kind is int:
        if not _INT.fullmatch(text):
            raise ValueError(f"PARAMETER {key} expects an integer, got {raw!r}")
        value = int(text)
    else:
        if not _FLOAT.fullmatch(text):
            raise ValueError(f"PARAMETER {key} expects a number, got {raw!r}")
        value = float(text)
    check = _RANGES.get(key)
    if check is not None and not check[0](value):
        raise ValueError(f"PARAMETER {key} must be {check[1]}, got {text}")
    return value


class _Parser:
    """One pass over the lines; ``self.index`` is the 0-based line being read."""

    def __init__(self, text: str, source: str) -> None:
        lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
        if lines[-1] == "":  # the newline that ends the last line (or an empty text)
            lines.pop()
        self.lines = lines
        self.source = source
        self.index = 0

    def error(self, line: int, directive: str, message: str) -> ModelfileError:
        return ModelfileError(line, directive, message, source=self.source)

    def parse(self) -> Modelfile:
        first: dict[str, int] = {}  # once-only directive -> line of its first use
        param_lines: dict[str, int] = {}
        from_: str | None = None
        params: dict[str, ParamValue | list[str]] = {}
        template: str | None = None
        system: str | None = None
        adapter: str | None = None
        projector: str | None = None
        messages: list[Message] = []
        licenses: list[str] = []

        while self.index < len(self.lines):
            line_no = self.index + 1
            line = self.lines[self.index].lstrip()
            if not line.strip() or line.startswith("#"):
                self.index += 1
                continue
            word = line.split(maxsplit=1)[0]
            rest = line[len(word) :].lstrip()
            directive = self._directive(word, line_no)
            if directive == "FROM" and projector is not None:
                raise self.error(
                    line_no, directive, "at most two FROM lines (a model and its projector)"
                )
            if directive in _ONCE:
                if directive in first:
                    raise self.error(
                        line_no,
                        directive,
                        f"only one {directive} is allowed (the first is on line {first[directive]})",
                    )
                first[directive] = line_no
            if not rest.strip():
                raise self.error(line_no, directive, f"{directive} needs {_NEEDS[directive]}")

            if directive == "PARAMETER":
                name, value_text = _split_word(rest)
                try:
                    key = _known_name(name)
                except ValueError as exc:
                    raise self.error(line_no, directive, str(exc)) from None
                if not value_text.strip():
                    raise self.error(line_no, directive, f"PARAMETER {key} needs a value")
                raw = self._argument(value_text, directive)
                try:
                    value = parse_parameter(key, raw)
                except ValueError as exc:
                    raise self.error(line_no, directive, str(exc)) from None
                if key in LIST_PARAMETERS:
                    listed = params.setdefault(key, [])
                    assert isinstance(listed, list)
                    listed.append(str(value))
                elif key in param_lines:
                    raise self.error(
                        line_no,
                        directive,
                        f"PARAMETER {key} is already set (on line {param_lines[key]})",
                    )
                else:
                    params[key] = value
                param_lines.setdefault(key, line_no)
            elif directive == "MESSAGE":
                role_word, content_text = _split_word(rest)
                role = role_word.lower()
                if role not in ROLES:
                    raise self.error(
                        line_no,
                        directive,
                        f"MESSAGE role must be one of {', '.join(ROLES)}, got {role_word!r}",
                    )
                if not content_text.strip():
                    raise self.error(line_no, directive, f"MESSAGE {role} needs content")
                messages.append(Message(role, self._argument(content_text, directive)))
            else:
                arg = self._argument(rest, directive)
                if directive in ("FROM", "ADAPTER") and not arg:
                    raise self.error(line_no, directive, f"{directive} needs {_NEEDS[directive]}")
                if directive == "FROM" and from_ is None:
                    from_ = arg
                elif directive == "FROM":
                    projector = arg
                elif directive == "ADAPTER":
                    adapter = arg
                elif directive == "TEMPLATE":
                    template = arg
                elif directive == "SYSTEM":
                    system = arg
                else:
                    licenses.append(arg)
            self.index += 1

        if from_ is None:
            raise self.error(len(self.lines), "FROM", "a Modelfile needs a FROM line")
        return Modelfile(
            from_=from_,
            parameters=params,
            template=template,
            system=system,
            messages=messages,
            license=licenses,
            adapter=adapter,
            projector=projector,
        )

    def _directive(self, word: str, line_no: int) -> str:
        if not (word.isascii() and word.isalpha()):
            raise self.error(
                line_no, "", f"expected a directive ({', '.join(_DIRECTIVES)}), got {word!r}"
            )
        directive = word.upper()
        if directive not in _DIRECTIVES:
            close = difflib.get_close_matches(directive, _DIRECTIVES, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise self.error(line_no, directive, f"unknown directive {word!r}{hint}")
        return directive

    def _argument(self, text: str, directive: str) -> str:
        """Read the argument starting at ``text`` (non-blank, on the current line).

        A triple-quoted string moves ``self.index`` to the line that closes it.
        """
        start = self.index + 1
        if text.startswith(_TRIPLE):
            body = text[len(_TRIPLE) :]
            parts: list[str] = []
            while (end := body.find(_TRIPLE)) < 0:
                parts.append(body)
                self.index += 1
                if self.index >= len(self.lines):
                    raise self.error(
                        start,
                        directive,
                        f"unterminated triple-quoted string: no closing {_TRIPLE} "
                        f"before the end of the file (it starts on line {start})",
                    )
                body = self.lines[self.index]
            parts.append(body[:end])
            self._nothing_after(body[end + len(_TRIPLE) :], directive)
            return "\n".join(parts)
        if text.startswith('"'):
            out: list[str] = []
            i = 1
            while i < len(text):
                ch = text[i]
                if ch == '"':
                    self._nothing_after(text[i + 1 :], directive)
                    return "".join(out)
                if ch == "\\" and i + 1 < len(text):
                    out.append(_ESCAPES.get(text[i + 1], text[i : i + 2]))
                    i += 2
                    continue
                out.append(ch)
                i += 1
            raise self.error(
                start,
                directive,
                'unterminated double-quoted string: the closing " must be on the same line '
                '(use """ for text that spans lines)',
            )
        return text.strip()

    def _nothing_after(self, tail: str, directive: str) -> None:
        if tail.strip():
            raise self.error(
                self.index + 1,
                directive,
                f"unexpected text after the closing quote: {tail.strip()!r}",
            )


def _split_word(text: str) -> tuple[str, str]:
    """``"name rest of line"`` -> ``("name", "rest of line")`` (the rest left-stripped)."""
    word = text.split(maxsplit=1)[0]
    return word, text[len(word) :].lstrip()


def parse_modelfile(text: str, *, source: str = "Modelfile") -> Modelfile:
    """Parse a Modelfile; ModelfileError names the line, the directive and the problem.

    ``source`` is the name used in messages (a file name, or "Modelfile").
    """
    return _Parser(text, source).parse()


def _quoted(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
    )
    return f'"{escaped}"'


def _triple_safe(text: str) -> bool:
    # '\r' would not survive the line-ending normalisation; a trailing '"' would
    # merge with the closing quotes.
    return _TRIPLE not in text and not text.endswith('"') and "\r" not in text


def _block(text: str) -> str:
    """A TEMPLATE/SYSTEM/LICENSE argument: triple-quoted when that is exact."""
    return f"{_TRIPLE}{text}{_TRIPLE}" if _triple_safe(text) else _quoted(text)


def _value(text: str) -> str:
    """A one-word value bare, multi-line text triple-quoted, anything else double-quoted."""
    if text and '"' not in text and "#" not in text and not any(c.isspace() for c in text):
        return text
    if "\n" in text and _triple_safe(text):
        return f"{_TRIPLE}{text}{_TRIPLE}"
    return _quoted(text)


def _param(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return _value(value)


def render_modelfile(mf: Modelfile) -> str:
    """The canonical text of ``mf``: ``parse_modelfile(render_modelfile(mf)) == mf``."""
    lines = [f"FROM {_value(mf.from_)}"]
    if mf.projector is not None:
        lines.append(f"FROM {_value(mf.projector)}")
    if mf.adapter is not None:
        lines.append(f"ADAPTER {_value(mf.adapter)}")
    for name, value in mf.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {name} {_param(item)}")
    if mf.template is not None:
        lines.append(f"TEMPLATE {_block(mf.template)}")
    if mf.system is not None:
        lines.append(f"SYSTEM {_block(mf.system)}")
    lines.extend(f"MESSAGE {m.role} {_value(m.content)}" for m in mf.messages)
    lines.extend(f"LICENSE {_block(text)}" for text in mf.license)
    return "\n".join(lines) + "\n"
