"""API keys: ``ffk_`` + 43 URL-safe characters, stored only as SHA-256 hashes.

The key file (JSON, written atomically with mode 0600 by
:mod:`gateway.keyfiles`) is reread when it changes on disk, so keys created
or revoked by another process (``ferrous key create`` while the server runs)
apply without a restart. A key is named by its stored prefix (``ffk_`` + 8
characters): enough to list and revoke it, never enough to use it.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec

from gateway.keyfiles import (
    ApiKeyFile,
    ApiKeyRecord,
    WatchedFile,
    parse_api_keys,
    write_private_file,
)
from gateway.principal import (
    MAX_OPAQUE_CHARS,
    Principal,
    Unauthorized,
    checked_priority,
    digest,
)
from gateway.scopes import DEFAULT_SCOPES, parse_scopes
from protocol.messages import MAX_PRIORITY, MIN_PRIORITY

__all__ = ["API_KEY_PREFIX", "ApiKeyInfo", "ApiKeyStore"]

API_KEY_PREFIX = "ffk_"

_SHOWN = len(API_KEY_PREFIX) + 8  # the part of a key kept on disk to name it


class ApiKeyInfo(msgspec.Struct, frozen=True):
    """What is known about a stored API key (never the key itself)."""

    prefix: str
    user: str
    tenant: str | None
    name: str
    created: float
    scopes: list[str] = msgspec.field(default_factory=lambda: sorted(DEFAULT_SCOPES))
    priority: int = 0


class ApiKeyStore:
    """The key file at ``path``: check, create, revoke, list. Safe to call from several threads."""

    def __init__(self, path: Path, *, clock: Callable[[], float]) -> None:
        self._file = WatchedFile[list[ApiKeyRecord]](path, parse_api_keys, [])
        self._clock = clock
        self._lock = threading.Lock()

    def authenticate(self, key: str) -> Principal:
        """The principal of ``key``, or :class:`Unauthorized`."""
        if len(key) > MAX_OPAQUE_CHARS:
            raise Unauthorized("unknown API key")
        wanted = digest(key)
        found: ApiKeyRecord | None = None
        for record in self._records():
            try:
                stored = bytes.fromhex(record.sha256)
            except ValueError:
                continue
            # Every record is compared (constant time each), not just up to a match.
            if hmac.compare_digest(stored, wanted) and found is None:
                found = record
        if found is None:
            raise Unauthorized("unknown API key")
        try:
            scopes = parse_scopes(found.scopes)
        except ValueError:
            raise Unauthorized("the API key's scopes are invalid") from None
        return Principal(
            found.user,
            found.tenant,
            "api_key",
            None,
            scopes,
            found.prefix,
            max_priority=max(MIN_PRIORITY, min(MAX_PRIORITY, found.priority)),
        )

    def key_ids(self) -> frozenset[str]:
        """The prefixes of the keys that exist now."""
        return frozenset(r.prefix for r in self._records())

    def create(
        self,
        user: str,
        tenant: str | None = None,
        name: str = "",
        scopes: frozenset[str] | None = None,
        priority: int = 0,
    ) -> str:
        """A new key for ``user``; the plaintext is returned here and stored nowhere."""
        if not user:
            raise ValueError("user must not be empty")
        if tenant is not None and not tenant.strip():
            raise ValueError("tenant must not be empty")
        scope_list = sorted(parse_scopes(sorted(scopes))) if scopes is not None else None
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            sha256=digest(key).hex(),
            prefix=key[:_SHOWN],
            user=user,
            tenant=tenant or None,
            name=name,
            created=self._clock(),
            scopes=scope_list,
            priority=checked_priority(priority),
        )
        with self._lock:
            records = self._read_for_update()
            records.append(record)
            self._write(records)
        return key

    def revoke(self, key_or_prefix: str) -> bool:
        """Delete a key named by its full text or by its stored prefix; whether one was.

        A prefix shared by several keys raises :class:`ValueError` rather than
        deleting more than was meant.
        """
        if not key_or_prefix:
            return False
        wanted = digest(key_or_prefix).hex()
        with self._lock:
            records = self._read_for_update()
            by_key = [r for r in records if hmac.compare_digest(r.sha256, wanted)]
            doomed = by_key or [r for r in records if r.prefix == key_or_prefix]
            if len(doomed) > 1 and not by_key:
                raise ValueError(f"prefix {key_or_prefix!r} names {len(doomed)} keys")
            if not doomed:
                return False
            self._write([r for r in records if r not in doomed])
        return True

    def stored(self) -> list[ApiKeyInfo]:
        """The stored keys, oldest first, without their secrets."""
        return [
            ApiKeyInfo(
                r.prefix,
                r.user,
                r.tenant,
                r.name,
                r.created,
                sorted(r.scopes or DEFAULT_SCOPES),
                r.priority,
            )
            for r in self._records()
        ]

    def _records(self) -> list[ApiKeyRecord]:
        with self._lock:
            return self._file.load(strict=False)

    def _read_for_update(self) -> list[ApiKeyRecord]:
        try:
            return list(self._file.load(strict=True))
        except FileNotFoundError:
            return []

    def _write(self, records: list[ApiKeyRecord]) -> None:
        data = msgspec.json.format(msgspec.json.encode(ApiKeyFile(keys=records)), indent=2)
        write_private_file(self._file.path, data + b"\n")
        self._file.load(strict=False)
