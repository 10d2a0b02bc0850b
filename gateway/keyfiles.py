"""The files behind authentication: the local secret, public keys, the API key file.

Kept apart from :mod:`gateway.auth` (which decides who is calling) because
these are about bytes on disk: a secret created once with ``O_EXCL`` and mode
0600 and refused when others can read it; files replaced atomically; PEM and
JWKS files reduced to the keys that may verify a token (RSA of at least 2048
bits for RS256, P-256 for ES256: a key's type fixes its one algorithm); and a
file reparsed only when it changes on disk, yielding nothing (not stale keys)
when it can no longer be read.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

__all__ = [
    "ApiKeyFile",
    "ApiKeyRecord",
    "PublicKey",
    "WatchedFile",
    "load_or_create_secret",
    "parse_api_keys",
    "parse_jwks",
    "parse_pem",
    "write_private_file",
]

log = logging.getLogger("ferrous.auth")

_SECRET_BYTES = 32
_MIN_RSA_BITS = 2048

_T = TypeVar("_T")


class ApiKeyRecord(msgspec.Struct, frozen=True):
    sha256: str
    prefix: str
    user: str
    tenant: str | None
    name: str
    created: float
    # Absent in key files written before scopes existed: those keys get the defaults.
    scopes: list[str] | None = None
    priority: int = 0  # the highest scheduling priority the key's requests may ask for


class ApiKeyFile(msgspec.Struct):
    version: int = 1
    keys: list[ApiKeyRecord] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PublicKey:
    alg: str
    kid: str | None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def load_or_create_secret(path: Path) -> bytes:
    """The local HS256 secret at ``path``: created on first call, then read back.

    On disk it is 64 hex characters (32 random bytes), created with
    ``O_CREAT | O_EXCL`` and mode 0600 so two processes starting together
    cannot both write one. Returns the decoded bytes. Raises :class:`ValueError`
    if the file is accessible by group or others, or does not hold a secret.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    secret = secrets.token_bytes(_SECRET_BYTES)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secret.hex().encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info("created auth secret %s", path)
    return secret


def _read_secret(path: Path) -> bytes:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"auth secret {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ValueError(
                f"auth secret {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        data = f.read(4096)
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) < _SECRET_BYTES:
        raise ValueError(
            f"auth secret {path} must hold at least {2 * _SECRET_BYTES} hex characters; "
            "delete it to have a new one created"
        )
    return secret


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, readable by its owner only."""
    _write_atomic(path, data)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class WatchedFile(Generic[_T]):
    """A file parsed once and parsed again only when it changes on disk.

    A file that disappears or stops parsing after start-up yields ``empty``
    (and a warning): keys that can no longer be read are not trusted.
    """

    def __init__(self, path: Path, parse: Callable[[bytes], _T], empty: _T) -> None:
        self.path = path
        self._parse = parse
        self._empty = empty
        self._signature: tuple[int, int, int] | None = None
        self._value = empty

    def load(self, *, strict: bool) -> _T:
        """The current contents; with ``strict``, errors raise instead of yielding ``empty``."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if strict:
                raise
            self._signature, self._value = None, self._empty
            return self._value
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._signature and not strict:
            return self._value
        try:
            value = self._parse(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            if strict:
                raise
            if signature != self._signature:
                log.warning("ignoring %s: %s", self.path, exc)
            self._signature, self._value = signature, self._empty
            return self._value
        self._signature, self._value = signature, value
        return value


def _key_alg(key: object) -> str | None:
    """The one algorithm a public key verifies, or None when it is not usable here."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS:
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    return None


def parse_pem(data: bytes) -> list[PublicKey]:
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"unsupported key type: {exc}") from None
    alg = _key_alg(key)
    if alg is None or not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(
            f"need an RSA public key of at least {_MIN_RSA_BITS} bits or an EC P-256 public key"
        )
    return [PublicKey(alg, None, key)]


def parse_jwks(data: bytes) -> list[PublicKey]:
    try:
        obj = msgspec.json.decode(data, type=dict[str, Any])
        keyset = jwt.PyJWKSet.from_dict(obj)
    except (msgspec.DecodeError, jwt.PyJWTError) as exc:
        raise ValueError(f"not a usable JWK set: {exc}") from None
    keys: list[PublicKey] = []
    for jwk in keyset.keys:
        if jwk.public_key_use not in (None, "sig"):
            continue
        alg = _key_alg(jwk.key)
        # The JWK's declared (or derived) algorithm must agree with its key type.
        if alg is None or alg != jwk.algorithm_name:
            continue
        if isinstance(jwk.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            keys.append(PublicKey(alg, jwk.key_id, jwk.key))
    if not keys:
        raise ValueError("no RS256 or ES256 public signing keys in the JWK set")
    return keys


def parse_api_keys(data: bytes) -> list[ApiKeyRecord]:
    try:
        return msgspec.json.decode(data, type=ApiKeyFile).keys
    except msgspec.DecodeError as exc:
        raise ValueError(f"not an API key file: {exc}") from None
