"""What a network client may name as the source of a pull or a Modelfile's FROM.

The CLI, run by the server's own user, may import any file it can read. A
network client (HTTP, WebSocket) may not: the server's disk is not its to
read. :func:`check_remote_source` decides, before anything touches the file
system, whether a source text is acceptable:

- a model name (``name[:tag]``): a stored or catalogued model, resolved by name
  only, never as a path relative to the server's working directory;
- a URL whose scheme is in ``[sources] schemes`` (``https``, ``hf``, ``pypi``
  and ``tiny`` by default);
- a local path, only for callers with the ``admin`` scope and only inside a
  directory of ``[sources] local_dirs``, judged on the fully resolved path
  (symlinks and ``..`` followed), so a link inside cannot point outside.

Every refusal reads the same whether the path exists or not, so the answer
says nothing about the server's files. Pure apart from ``os.path.realpath``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import unquote

from engine.store.names import looks_like_ref
from protocol.errors import BadRequest, Forbidden

__all__ = ["check_remote_source", "confined_path"]

_PATH_STARTS = ("/", "./", "../", "~", "file://")


def confined_path(text: str, allowed_dirs: Sequence[str]) -> str | None:
    """The real path of ``text`` when it lies inside one of ``allowed_dirs``, else None.

    Only absolute paths (or ``file://`` URLs) are considered: a relative path
    would be read against the server's working directory, which a client
    cannot know and must not probe.
    """
    raw = unquote(text[7:]) if text.startswith("file://") else text
    if not raw.startswith("/") or "\x00" in raw:
        return None
    real = os.path.realpath(raw)
    for allowed in allowed_dirs:
        root = os.path.realpath(os.path.expanduser(allowed))
        if os.path.commonpath([root, real]) == root:
            return real
    return None


def check_remote_source(
    text: str, *, schemes: Sequence[str], local_dirs: Sequence[str], admin: bool
) -> str:
    """The source a network client may use for ``text`` (raises Forbidden/BadRequest).

    Returns ``text`` itself for model names and allowed URLs, and the
    resolved ``file://`` URL for an allowed local path.
    """
    scheme, sep, _rest = text.partition("://")
    if sep and scheme.lower() != "file":
        if scheme.lower() in schemes:
            return text
        allowed = ", ".join(f"{s}://" for s in schemes) or "none"
        raise Forbidden(f"{scheme}:// sources are not allowed on this server (allowed: {allowed})")
    if not text.startswith(_PATH_STARTS) and looks_like_ref(text):
        return text  # a model name: resolved in the store or the catalog, never as a path
    refusal = Forbidden(
        "local files cannot be imported over the network here: use a model name, "
        "a URL, or `ferrous create` on the server"
    )
    if not admin or not local_dirs:
        raise refusal
    real = confined_path(text, local_dirs)
    if real is None:
        raise refusal
    return "file://" + real


def require_model_name(text: str) -> None:
    """Raise BadRequest unless ``text`` is a model name (for fields that take only names)."""
    if not looks_like_ref(text):
        raise BadRequest(f"{text[:80]!r} is not a model name")
