"""Durations as people and Ollama clients write them: ``"5m"``, ``"1h30m"``, ``"90s"``, ``300``.

Used for ``keep_alive``: a number is seconds; a string is a sequence of
``<number><unit>`` with units ``ms``, ``s``, ``m``, ``h`` (a bare number in a
string is seconds too). Negative means "forever" and zero "not at all".
Pure: no I/O.
"""

from __future__ import annotations

import math
import re

from .errors import BadRequest

__all__ = ["format_duration", "parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | int | str, *, field: str = "keep_alive") -> float:
    """Seconds for ``value``; raise BadRequest naming ``field`` when it is not a duration."""
    if isinstance(value, bool):
        raise BadRequest(f'{field} must be a duration such as "5m" or a number of seconds')
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise BadRequest(f"{field} must be finite")
        return float(value)
    seconds = _parse_text(value, field)
    # float() reads "inf", "nan" and "1e999" too, and a long run of digits overflows to inf:
    # the string path must be as finite as the number path (these end up in engine timers).
    if not math.isfinite(seconds):
        raise BadRequest(f"{field} must be finite")
    return seconds


def _parse_text(value: str, field: str) -> float:
    text = value.strip().lower()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:
        return sign * float(body)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise BadRequest(
            f'{field} {value!r} is not a duration: use e.g. "30s", "5m", "1h", 0 or -1'
        )
    return sign * total


def format_duration(seconds: float) -> str:
    """A short human form: ``"4m 59s"``, ``"forever"``."""
    if seconds < 0:
        return "forever"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec}s"
    return f"{sec}s"
