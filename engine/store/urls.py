"""Source URLs as they may be shown: without the credentials they sometimes carry.

``https://user:token@host/model.gguf`` is a working source, and its userinfo
is a secret. Anything that shows or logs a source (manifests in answers,
log lines, error messages, progress) passes it through :func:`redact_url`.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url"]


def redact_url(text: str | None) -> str | None:
    """``text`` with any ``user:password@`` removed from its authority (None stays None)."""
    if text is None or "@" not in text or "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text.split("://", 1)[0] + "://[invalid URL]"
    if "@" not in parts.netloc:
        return text
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))
