"""``ferrous run``'s interactive session: the line commands, as pure parsing.

A session is a conversation with one model plus the settings the user
changed. Each line the user types is either a message for the model or a
command, and only what :func:`parse` calls a message is ever sent: ``/?``
or a mistyped ``/sett`` must not reach the model as a question. Commands
follow Ollama's, since that is what people type:

* ``/?`` or ``/help`` — the list;
* ``/set parameter NAME VALUE`` (temperature, top_k, top_p, min_p,
  repeat_penalty, seed, num_predict or max_tokens), ``/set system TEXT``;
* ``/set format json`` (answers are JSON), ``/set noformat``;
* ``/show parameters``, ``/show system``, ``/show info``, ``/show modelfile``;
* ``/clear`` — forget the conversation (the settings stay);
* ``/save NAME`` — store the session as a model (FROM the model, its
  parameters, system message and the conversation as MESSAGEs); ``/load
  NAME`` — continue with another model, from an empty conversation;
* ``/bye`` or ``/exit`` — leave (Ctrl-D too);
* a line of ``\"\"\"`` starts (and another ends) a message of several lines;
* paths of image files in a message (``./cat.png``, ``'~/My photos/a.jpg'``)
  are taken out of its text and sent as its images, for a vision model
  (:func:`image_paths` finds them; the CLI keeps those that are files).

No I/O here: the CLI reads lines and carries out what :func:`parse` returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Literal

import msgspec

from engine.store.modelfile import Message, Modelfile, ParamValue, render_modelfile
from protocol import messages as m

__all__ = ["HELP", "Command", "Session", "image_paths", "parse"]

_EXT = r"\.(?:png|jpe?g|webp|gif|bmp)"
# A quoted path (which may hold spaces), or an unquoted one without spaces.
_IMAGE_PATH = re.compile(
    rf"'([^'\n]+{_EXT})'|\"([^\"\n]+{_EXT})\"|((?<![\w'\"])[^\s'\",;]+{_EXT})(?![\w/]|\.\w)",
    re.IGNORECASE,
)


def image_paths(text: str) -> list[tuple[str, str]]:
    """What in ``text`` looks like the path of an image file: ``(as written, path)``
    pairs in order (quotes taken off the path; whether it is a file is the caller's
    question)."""
    return [
        (match.group(0), next(g for g in match.groups() if g))
        for match in _IMAGE_PATH.finditer(text)
    ]


HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (temperature, top_k, top_p,
                              min_p, repeat_penalty, seed, num_predict)
  /set system TEXT            set the system message
  /set format json            answer in JSON (/set noformat: free text)
  /show parameters|system|info|modelfile
  /clear                      start a new conversation
  /save NAME                  save the session (settings and messages) as a model
  /load NAME                  switch to another model, starting a new conversation
  /bye                        leave (or Ctrl-D)
  /?, /help                   this list

Use \"\"\" to begin and end a message of several lines. Paths of image files in a
message (./cat.png, '~/My photos/a.jpg') are sent as its images, for a vision model."""

# /set parameter names (Ollama's and ours) -> the Options field they set.
_PARAMETERS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
    "max_tokens": "max_tokens",
}
_INTEGERS = {"top_k", "seed", "max_tokens"}
_COMMANDS = ["/set", "/show", "/clear", "/save", "/load", "/bye", "/exit", "/help", "/?"]
# Options fields -> the Modelfile PARAMETER names /save writes.
_MODELFILE_NAMES = {"max_tokens": "num_predict"}


@dataclass
class Session:
    """What the user has set, and the conversation so far (the server's id for it)."""

    model: str
    options: m.Options = field(default_factory=m.Options)
    system: str | None = None
    system_sent: bool = False  # the system message went with the conversation's first turn
    conversation: str | None = None
    format: Literal["json"] | None = None  # answers constrained to JSON
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) so far


@dataclass(frozen=True)
class Command:
    """What a line asks for: ``kind`` is message, help, show, done (a setting changed),
    save (``text`` is the Modelfile, ``name`` the model), quit or error; ``text`` is
    the message or what to print."""

    kind: str
    text: str = ""
    name: str = ""


def parse(line: str, session: Session) -> Command:
    """Carry out a settings command on ``session``, or say what else ``line`` is."""
    stripped = line.strip()
    if not stripped.startswith("/"):
        return Command("message", line)
    word, _, rest = stripped.partition(" ")
    rest = rest.strip()
    if word in ("/bye", "/exit"):
        return Command("quit")
    if word in ("/?", "/help"):
        return Command("help", HELP)
    if word == "/clear":
        session.conversation = None
        session.system_sent = False
        session.turns = []
        return Command("done", "Cleared the conversation.")
    if word == "/save":
        if not rest or " " in rest:
            return Command("error", "Usage: /save NAME")
        return Command("save", modelfile_of(session), name=rest)
    if word == "/load":
        if not rest or " " in rest:
            return Command("error", "Usage: /load NAME")
        session.model = rest
        session.conversation = None
        session.system_sent = False
        session.turns = []
        return Command("done", f"Loading model {rest!r}: a new conversation.")
    if word == "/set":
        return _set(rest, session)
    if word == "/show":
        return _show(rest, session)
    guess = get_close_matches(word, _COMMANDS, n=1, cutoff=0.6)
    hint = f" (did you mean {guess[0]}?)" if guess else ""
    return Command("error", f"Unknown command {word!r}{hint}. Type /? for help.")


def _set(rest: str, session: Session) -> Command:
    what, _, value = rest.partition(" ")
    value = value.strip()
    if what == "format":
        if value != "json":
            return Command("error", "Usage: /set format json (or /set noformat)")
        session.format = "json"
        return Command("done", "Set format to 'json'.")
    if what == "noformat":
        session.format = None
        return Command("done", "Cleared the format.")
    if what == "system":
        session.system = value or None
        session.system_sent = False
        return Command(
            "done", "Set the system message." if value else "Cleared the system message."
        )
    if what != "parameter":
        return Command(
            "error", "Usage: /set parameter NAME VALUE, /set system TEXT or /set format json"
        )
    name, _, raw = value.partition(" ")
    field_name = _PARAMETERS.get(name)
    if field_name is None:
        guess = get_close_matches(name, list(_PARAMETERS), n=1, cutoff=0.6)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        return Command("error", f"Unknown parameter {name!r}{hint}.")
    try:
        parsed: float | int = int(raw) if field_name in _INTEGERS else float(raw)
        session.options = msgspec.convert(
            {**msgspec.to_builtins(session.options), field_name: parsed}, m.Options
        )
    except (ValueError, msgspec.ValidationError) as exc:
        return Command("error", f"Bad value for {name}: {raw!r} ({exc}).")
    return Command("done", f"Set parameter {name!r} to {raw!r}.")


def _show(rest: str, session: Session) -> Command:
    if rest == "parameters":
        values = msgspec.to_builtins(session.options)
        if not values:
            return Command("show", "No parameters set (the model's defaults apply).")
        return Command("show", "\n".join(f"{k:<16} {v}" for k, v in values.items()))
    if rest == "system":
        return Command("show", session.system or "No system message set.")
    if rest == "info":
        return Command("show", f"model  {session.model}")
    if rest == "modelfile":
        return Command("show", modelfile_of(session).rstrip("\n"))
    return Command("error", "Usage: /show parameters|system|info|modelfile")


def modelfile_of(session: Session) -> str:
    """The session as a Modelfile: what ``/save`` stores."""
    parameters: dict[str, ParamValue | list[str]] = {}
    for key, value in msgspec.to_builtins(session.options).items():
        if key == "ignore_eos":
            continue
        parameters[_MODELFILE_NAMES.get(key, key)] = value
    messages = [
        Message(role, text)
        for question, answer in session.turns
        for role, text in (("user", question), ("assistant", answer))
    ]
    return render_modelfile(
        Modelfile(
            from_=session.model, parameters=parameters, system=session.system, messages=messages
        )
    )
