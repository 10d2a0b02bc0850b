"""One validated :class:`~gateway.config.ServerConfig` built from four layers.

Later layers win, key by key::

    defaults  <  TOML file  <  FERROUS_* environment  <  CLI overrides

The file is ``path`` when given (it must then exist), else
``FERROUS_HOME/config.toml`` when present. Environment variables name a
top-level key (``FERROUS_PORT=9000``) or a nested one with a double underscore
(``FERROUS_AUTH__ENABLED=false``, ``FERROUS_MODELS__TINY__PATH=/m/tiny.gguf``);
``FERROUS_HOME`` sets ``home``. Overrides use dotted keys (``{"auth.enabled": False}``).

The layers are merged as plain dicts and validated once by msgspec, so every
value, whatever its origin, passes the same type and range checks. A bad value
stops start-up with a :class:`ConfigError` that names the dotted key, what was
expected, and which file, variable or override supplied it: a server that
silently ignores a misspelt limit is worse than one that refuses to start.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec
import msgspec.inspect as mi

from gateway.config import (
    CONFIG_FILE,
    ENV_PREFIX,
    HOME_ENV,
    REDACTED,
    ConfigError,
    ServerConfig,
    parse_size,
)
from protocol.durations import parse_duration
from protocol.errors import FerrousError

__all__ = ["load_config", "redacted", "render_toml"]


# --------------------------------------------------------------------------- schema

_Segment = str | int
_Path = tuple[_Segment, ...]
_SCHEMA = mi.type_info(ServerConfig)


def _unwrap(info: mi.Type) -> mi.Type:
    while isinstance(info, mi.Metadata):
        info = info.type
    return info


def _type_at(path: _Path) -> mi.Type | None:
    """The schema type at ``path``, or None when no such key exists."""
    info: mi.Type = _SCHEMA
    for seg in path:
        info = _unwrap(info)
        if isinstance(info, mi.StructType) and isinstance(seg, str):
            found = [f.type for f in info.fields if f.encode_name == seg]
            if not found:
                return None
            info = found[0]
        elif isinstance(info, mi.DictType) and isinstance(seg, str):
            info = info.value_type
        elif isinstance(info, (mi.ListType, mi.SetType, mi.VarTupleType)) and isinstance(seg, int):
            info = info.item_type
        else:
            return None
    return _unwrap(info)


def _dotted(path: _Path) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            key = seg if re.fullmatch(r"[A-Za-z0-9_-]+", seg) else json.dumps(seg)
            out += f".{key}" if out else key
    return out


# --------------------------------------------------------------------------- layers

_Sources = dict[_Path, str]


def _coerce_text(value: str, info: mi.Type | None, path: _Path, origin: str) -> object:
    """Give a string from the environment or a flag the shape its key needs.

    Scalars stay strings (msgspec's lax conversion turns "9000" into 9000 and
    "false" into False); lists take "a,b" or JSON; tables take JSON.
    """
    text = value.strip()
    if isinstance(info, (mi.ListType, mi.SetType, mi.VarTupleType)):
        if text.startswith("["):
            return _json_value(text, path, origin)
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(info, (mi.StructType, mi.DictType)):
        return _json_value(text, path, origin)
    return value


def _json_value(text: str, path: _Path, origin: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config: {_dotted(path)!r} expected JSON, {exc} ({origin})") from None


def _set(
    data: dict[str, object], path: _Path, value: object, origin: str, sources: _Sources
) -> None:
    node = data
    for i, seg in enumerate(path[:-1]):
        child = node.get(str(seg))
        if not isinstance(child, dict):
            child = {}
            node[str(seg)] = child
            _forget(sources, path[: i + 1])
        node = child
    node[str(path[-1])] = value
    _forget(sources, path)
    sources[path] = origin


def _forget(sources: _Sources, path: _Path) -> None:
    """Drop what an earlier layer said at or below ``path`` (it was replaced)."""
    n = len(path)
    for key in [k for k in sources if k[:n] == path]:
        del sources[key]


def _put(
    data: dict[str, object], path: _Path, value: object, origin: str, sources: _Sources
) -> None:
    """Merge ``value`` into ``data`` at ``path``: tables key by key, anything else whole."""
    if isinstance(value, Mapping) and (value or not path):
        for key, item in value.items():
            _put(data, (*path, str(key)), item, origin, sources)
    else:
        _set(data, path, copy.deepcopy(value), origin, sources)


def _read_file(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None


def _env_path(name: str) -> _Path | None:
    """The config key a FERROUS_* variable names; None when it does not look like one."""
    if name == HOME_ENV:
        return ("home",)
    rest = name[len(ENV_PREFIX) :]
    if not re.fullmatch(r"[A-Z0-9]+(?:_{1,2}[A-Z0-9]+)*", rest):
        return None
    return tuple(part.lower() for part in rest.split("__"))


def _apply_env(data: dict[str, object], env: Mapping[str, str], sources: _Sources) -> None:
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = _env_path(name)
        if path is None:
            continue
        origin = f"from environment variable {name}"
        info = _type_at(path)
        if info is None:
            raise ConfigError(
                f"config: unknown environment variable {name} (no config key {_dotted(path)!r})"
            )
        _put(data, path, _coerce_text(env[name], info, path, origin), origin, sources)


def _apply_overrides(
    data: dict[str, object], overrides: Mapping[str, object], sources: _Sources
) -> None:
    for key, value in overrides.items():
        path: _Path = tuple(key.split("."))
        origin = f"from override {key!r}"
        info = _type_at(path)
        if info is None or not all(path):
            raise ConfigError(f"config: unknown key {key!r} (override)")
        if isinstance(value, str):
            value = _coerce_text(value, info, path, origin)
        _put(data, path, value, origin, sources)


# --------------------------------------------------------------------------- errors

_AT = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`(?P<path>\$[^`]*)`)?$", re.DOTALL)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_ANY_KEY = "[...]"


def _parse_error(exc: msgspec.ValidationError) -> tuple[str, list[str | int]]:
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any string
    segments: list[str | int] = []
    for name, index in _SEGMENT.findall((m.group("path") or "$")[1:]):
        if name:
            segments.append(name)
        else:
            segments.append(_ANY_KEY if index == "..." else int(index))
    msg = m.group("msg")
    if m.group("key"):  # a table's key, not its value, is invalid
        msg = f"Key {msg[:1].lower()}{msg[1:]}"
    return msg, segments


def _resolve_keys(data: dict[str, object], segments: list[str | int]) -> tuple[str, _Path]:
    """Replace msgspec's ``[...]`` (a dict key it does not report) by the failing key.

    Each entry of the dict is validated on its own; the first one that fails is
    the one to name. Nested dicts are resolved the same way.
    """
    if _ANY_KEY not in segments:
        return "", tuple(segments)
    i = segments.index(_ANY_KEY)
    if i == 0 or not all(isinstance(s, str) for s in segments[:i]):
        return "", tuple(s for s in segments if s != _ANY_KEY)
    prefix = [str(s) for s in segments[:i]]
    node: object = data
    for seg in prefix:
        node = node[seg] if isinstance(node, dict) else None
    if isinstance(node, dict):
        for key in node:
            trial = copy.deepcopy(data)
            holder: dict[str, object] = trial
            for seg in prefix[:-1]:
                nxt = holder[seg]
                assert isinstance(nxt, dict)
                holder = nxt
            holder[prefix[-1]] = {key: node[key]}
            try:
                msgspec.convert(trial, ServerConfig, strict=False)
            except msgspec.ValidationError as exc:
                msg, inner = _parse_error(exc)
                inner_segments = [
                    key if s == _ANY_KEY and n == i else s for n, s in enumerate(inner)
                ]
                sub_msg, path = _resolve_keys(trial, inner_segments)
                return sub_msg or msg, path
    return "", tuple(s for s in segments if s != _ANY_KEY)


def _origin_of(path: _Path, sources: _Sources) -> str:
    n = len(path)
    for cut in range(n, 0, -1):  # the key itself or the nearest enclosing one
        if path[:cut] in sources:
            return sources[path[:cut]]
    below = {origin for key, origin in sources.items() if key[:n] == path}
    return below.pop() if len(below) == 1 else ""


def _explain(msg: str, path: _Path) -> str:
    if m := re.match(r"Object contains unknown field `(.*)`$", msg):
        return f"unknown key {_dotted((*path, m.group(1)))!r}"
    if m := re.match(r"Object missing required field `(.*)`$", msg):
        return f"missing key {_dotted((*path, m.group(1)))!r}"
    where = _dotted(path) or "config"
    if m := re.match(r"Invalid enum value (.*)$", msg):
        info = _type_at(path)
        if isinstance(info, mi.LiteralType):
            allowed = ", ".join(repr(v) for v in info.values)
            return f"{where!r} expected one of {allowed}, got {m.group(1)}"
    text = msg.replace("`object`", "`table`").replace("`", "")
    return f"{where!r} {text[:1].lower()}{text[1:]}"


def _validate(data: dict[str, object], sources: _Sources) -> ServerConfig:
    try:
        config = msgspec.convert(data, ServerConfig, strict=False)
    except msgspec.ValidationError as exc:
        msg, segments = _parse_error(exc)
        sub_msg, path = _resolve_keys(data, segments)
        msg = sub_msg or msg
        text = _explain(msg, path)
        unknown = re.match(r"Object contains unknown field `(.*)`$", msg)
        origin = _origin_of((*path, unknown.group(1)) if unknown else path, sources)
        suffix = f" ({origin})" if origin else ""
        raise ConfigError(f"config: {text}{suffix}") from None
    for key, check in (
        ("keep_alive", lambda: parse_duration(config.keep_alive)),
        ("memory_budget", lambda: parse_size(config.memory_budget)),
    ):
        try:
            check()
        except FerrousError as exc:
            origin = _origin_of((key,), sources)
            raise ConfigError(
                f"config: {exc.message}" + (f" ({origin})" if origin else "")
            ) from None
    return config


# --------------------------------------------------------------------------- public


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServerConfig:
    """Build the configuration from defaults, a TOML file, ``env`` and ``overrides``.

    ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` when the
    file is missing (given explicitly) or malformed, when a FERROUS_* variable
    or an override names no key, or when any value fails validation.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    overrides = overrides or {}
    data: dict[str, object] = {}
    sources: _Sources = {}

    if path is not None:
        file: Path | None = Path(path).expanduser()
    else:
        home = overrides.get("home") or environ.get(HOME_ENV) or ""
        base = Path(str(home)).expanduser() if home else Path.home() / ".ferrous"
        file = base / CONFIG_FILE
        if not file.is_file():
            file = None
    if file is not None:
        _put(data, (), _read_file(file), f"in {file}", sources)

    _apply_env(data, environ, sources)
    _apply_overrides(data, overrides, sources)
    return _validate(data, sources)


_SECRET_NAME = re.compile(r"secret|token|password", re.IGNORECASE)


def redacted(config: ServerConfig) -> dict[str, object]:
    """``config`` as builtins, safe to print: secret values become ``"***"``.

    A key whose name mentions a secret, token or password has its non-empty
    string value replaced, except ``*_file`` keys, which hold only a path.
    """

    def scrub(node: object) -> object:
        if isinstance(node, dict):
            out: dict[str, object] = {}
            for key, value in node.items():
                secret = (
                    isinstance(key, str)
                    and _SECRET_NAME.search(key) is not None
                    and not key.endswith("_file")
                    and isinstance(value, str)
                    and value != ""
                )
                out[key] = REDACTED if secret else scrub(value)
            return out
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    builtins = scrub(msgspec.to_builtins(config))
    assert isinstance(builtins, dict)
    return builtins


# --------------------------------------------------------------------------- TOML


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = [
            f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None
        ]
        return "{" + ", ".join(items) + "}" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def render_toml(data: Mapping[str, object]) -> str:
    """Write ``data`` (str keys; tables, arrays and scalars) as a TOML document.

    Tables become ``[section]`` headers, nested ones ``[a.b]``; arrays and
    values inside arrays are written inline. ``None`` has no TOML form and is left out.
    """
    lines: list[str] = []

    def table(prefix: tuple[str, ...], node: Mapping[str, object]) -> None:
        subtables: list[tuple[str, Mapping[str, object]]] = []
        implicit = bool(node) and all(isinstance(v, Mapping) for v in node.values())
        if prefix and not implicit:  # a table holding only tables needs no header of its own
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for key, value in node.items():
            if value is None:
                continue
            if isinstance(value, Mapping):
                subtables.append((str(key), value))
            else:
                lines.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
        for key, sub in subtables:
            table((*prefix, key), sub)

    table((), data)
    return "\n".join(lines) + "\n" if lines else ""
