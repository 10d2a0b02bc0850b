"""Model references: ``name[:tag]`` with an optional namespace, as Ollama spells them.

A reference is case-insensitive (stored lower-case) and has a default tag,
``latest``. Names are path segments in the store, so their alphabet is
restricted: a reference can never climb out of the manifests directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import get_close_matches

import msgspec

from engine.store.errors import StoreError

__all__ = ["DEFAULT_TAG", "ModelRef", "did_you_mean", "looks_like_ref", "parse_ref"]

DEFAULT_TAG = "latest"
_SEGMENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_TAG = re.compile(r"[a-z0-9_][a-z0-9._-]{0,127}")
MAX_SEGMENTS = 3


class ModelRef(msgspec.Struct, frozen=True, order=True):
    name: str  # "smollm2", "team/chat"
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def short(self) -> str:
        """The way people write it: without ``:latest``."""
        return self.name if self.tag == DEFAULT_TAG else str(self)


def _valid_name(name: str) -> bool:
    parts = name.split("/")
    return 0 < len(parts) <= MAX_SEGMENTS and all(
        _SEGMENT.fullmatch(p) and p not in (".", "..") and not p.endswith(".json") for p in parts
    )


def parse_ref(text: str) -> ModelRef:
    """Parse ``name[:tag]``; raise StoreError("invalid") naming what is wrong."""
    raw = text.strip().lower()
    name, sep, tag = raw.rpartition(":")
    if not sep or "/" in tag:  # no tag (a ':' inside a host:port segment is not a tag)
        name, tag = raw, DEFAULT_TAG
    if not _valid_name(name):
        raise StoreError(
            "invalid",
            f"invalid model name {text!r}: use letters, digits, '.', '_' and '-' "
            f"(up to {MAX_SEGMENTS} '/'-separated parts), optionally ':tag'",
        )
    if not _TAG.fullmatch(tag):
        raise StoreError("invalid", f"invalid tag {tag!r} in {text!r}")
    return ModelRef(name, tag)


def looks_like_ref(text: str) -> bool:
    try:
        parse_ref(text)
    except StoreError:
        return False
    return True


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the known name closest to a mistyped one, else ``""``.

    A model ``smolm2`` or a command ``lst`` is nearly always a typo of one the
    user has; naming it saves a trip to the list. ``name:latest`` is matched
    by its name too.
    """
    choices = {n: n for n in names}
    for n in list(choices):
        if n.endswith(f":{DEFAULT_TAG}"):
            choices.setdefault(n[: -len(DEFAULT_TAG) - 1], n[: -len(DEFAULT_TAG) - 1])
    close = get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {choices[close[0]]!r}?)" if close else ""
