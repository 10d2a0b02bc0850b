"""Who a caller is once authenticated, and the refusal when it is not.

Kept apart from :mod:`gateway.auth` (the JWT checks), :mod:`gateway.apikeys`
(the stored keys) and :mod:`gateway.tickets` (browser tickets): each turns a
credential into a :class:`Principal`, and everything past the door reads only
that.
"""

from __future__ import annotations

import hashlib

import msgspec

from gateway.quotas import Quota
from gateway.scopes import DEFAULT_SCOPES
from protocol.errors import ErrorCode, FerrousError
from protocol.messages import MAX_PRIORITY, MIN_PRIORITY

__all__ = ["MAX_OPAQUE_CHARS", "Principal", "Unauthorized", "checked_priority", "digest"]

MAX_OPAQUE_CHARS = 256
"""API keys and tickets are ~47 characters: a longer one is refused before it is hashed."""


class Unauthorized(FerrousError):
    """The credential is missing or not acceptable; the message says why in a few words."""

    code = ErrorCode.UNAUTHORIZED


class Principal(msgspec.Struct, frozen=True):
    """An authenticated caller."""

    user: str
    """The JWT ``sub`` or the API key's owner."""
    tenant: str | None
    """From the configured tenant claim, or the API key's tenant."""
    method: str
    """``"jwt"``, ``"api_key"``, ``"ticket"`` or ``"none"`` (auth disabled)."""
    expires_at: float | None
    """Unix time after which the credential is no longer valid; ``None`` = never."""
    scopes: frozenset[str] = DEFAULT_SCOPES
    """What the caller may do (:mod:`gateway.scopes`)."""
    key_id: str | None = None
    """The API key's stored prefix, for a caller (or a ticket) that came with a key:
    revoking that key ends the caller's sessions and spends its tickets."""
    max_priority: int = 0
    """The highest scheduling priority the caller's requests may ask for (a JWT
    ``priority`` claim or the API key's class); higher asks are lowered to it."""
    quota: Quota | None = None
    """Limits from a JWT ``quota`` claim, over the configured ones (gateway.quotas)."""
    token_id: str | None = None
    """The JWT's ``jti``, by which it can be revoked before it expires (gateway.credentials)."""


def checked_priority(priority: int) -> int:
    """``priority`` when it is a valid scheduling class, else :class:`ValueError`."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}")
    return priority


def digest(credential: str) -> bytes:
    """SHA-256 of an opaque credential: what is stored and compared, never the credential."""
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
