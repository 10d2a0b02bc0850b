"""Requests checked before they are sent, and server frames decoded into messages.

The server answers a frame it cannot decode (or one over its size limit) with
an error that names no generation, which the caller could not tie to the
request it made. So both clients validate each request against the protocol's
own message types, constraints included, and check its size against the
limits in ``ready`` before sending: a bad request raises here, at once.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ferrous_client.errors import BadRequest, FerrousClientError, TooLarge, error_from_code
from ferrous_client.protocol import messages as m
from ferrous_client.protocol.codec import Codec
from ferrous_client.protocol.errors import FerrousError

__all__ = [
    "AdaptersLike",
    "IdSource",
    "MessagesLike",
    "OptionsLike",
    "ToolsLike",
    "checked_frame",
    "decode_server",
    "error_from_message",
    "to_adapters",
    "to_chat_messages",
    "to_options",
    "to_tools",
    "utf8_len",
]

MessagesLike = str | Sequence[m.ChatMessage | Mapping[str, Any]]
"""A user message (str), or a list of ChatMessage / ``{"role", "content"}`` dicts; a
dict's ``images`` may be bytes, base64 text, data URLs or paths of image files."""

OptionsLike = m.Options | Mapping[str, Any] | None
"""Options, a dict of the same fields, or None for the server's defaults."""

ToolsLike = Sequence[m.Tool | Mapping[str, Any]] | None
"""Functions the model may call: Tool, or ``{"name", "description", "parameters"}`` dicts."""


AdaptersLike = Sequence[m.AdapterChoice | str | tuple[str, float]] | None
"""LoRA adapters: AdapterChoice, a model name (scale 1), or ``(name, scale)``; None: the
model's own."""


def to_adapters(adapters: AdaptersLike) -> list[m.AdapterChoice] | None:
    if adapters is None:
        return None
    out: list[m.AdapterChoice] = []
    for i, a in enumerate(adapters):
        if isinstance(a, m.AdapterChoice):
            out.append(a)
            continue
        name, scale = (a, 1.0) if isinstance(a, str) else a
        try:
            out.append(msgspec.convert({"name": name, "scale": scale}, m.AdapterChoice))
        except msgspec.ValidationError as exc:
            raise BadRequest(f"adapters[{i}]: {exc}") from None
    return out


def to_chat_messages(messages: MessagesLike) -> list[m.ChatMessage]:
    if isinstance(messages, str):
        return [m.ChatMessage("user", messages)]
    out: list[m.ChatMessage] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, m.ChatMessage):
            out.append(msg)
            continue
        images = msg.get("images")
        if images:  # files named by path are read here; bytes and base64 text go as they are
            msg = {**msg, "images": [_image(x) for x in images]}
        try:
            out.append(msgspec.convert(msg, m.ChatMessage))
        except msgspec.ValidationError as exc:
            raise BadRequest(f"messages[{i}]: {exc}") from None
    return out


def _image(x: Any) -> Any:
    if isinstance(x, os.PathLike):
        return Path(x).read_bytes()
    if isinstance(x, str) and x.startswith("data:") and "," in x:
        return x.split(",", 1)[1]  # a data URL's base64 part
    return x


def to_tools(tools: ToolsLike) -> list[m.Tool] | None:
    if tools is None:
        return None
    out: list[m.Tool] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, m.Tool):
            out.append(tool)
            continue
        try:
            out.append(msgspec.convert(tool, m.Tool))
        except msgspec.ValidationError as exc:
            raise BadRequest(f"tools[{i}]: {exc}") from None
    return out


def to_options(options: OptionsLike) -> m.Options | None:
    if options is None or isinstance(options, m.Options):
        return options
    try:
        return msgspec.convert(options, m.Options)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"options: {exc}") from None


def checked_frame(
    codec: Codec, msg: m.Chat | m.Generate, max_frame_bytes: int | None
) -> bytes | str:
    """Validate ``msg`` as the server will, then encode it; raise what the server would."""
    try:
        msgspec.convert(msgspec.to_builtins(msg), type(msg))
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid {type(msg).__name__.lower()} request: {exc}") from None
    data = codec.encode(msg)
    size = len(data) if isinstance(data, bytes) else utf8_len(data)
    if max_frame_bytes is not None and size > max_frame_bytes:
        raise TooLarge(
            f"the request is {size} bytes; this server accepts frames up to {max_frame_bytes}"
        )
    return data


def decode_server(codec: Codec, data: bytes | str) -> m.ServerMessage:
    try:
        return codec.decode_server(data)
    except FerrousError as exc:
        raise BadRequest(exc.message) from None


def error_from_message(msg: m.Error) -> FerrousClientError:
    err = error_from_code(
        msg.code.value, msg.message, generation_id=msg.id, retryable=msg.retryable
    )
    err.retry_after = msg.retry_after
    return err


def utf8_len(text: str) -> int:
    """Bytes of text as flow control counts them (UTF-8)."""
    return len(text.encode("utf-8"))


class IdSource:
    """Generation ids unique for the life of a client object (and across its reconnects)."""

    def __init__(self) -> None:
        self._prefix = "g" + secrets.token_hex(3)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"
