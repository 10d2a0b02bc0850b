"""Who is calling: JWTs, API keys and WebSocket tickets turned into a :class:`Principal`.

This module is the gateway's security boundary, so it is strict and says no by
default. Every refusal is an :class:`Unauthorized` whose message names the
reason in a few words ("token expired", "bad signature") and never echoes the
credential or any key material.

Three kinds of credential are accepted:

- **JWTs.** Only the configured algorithms (HS256, RS256, ES256) are accepted;
  ``none`` never is. The algorithm in the token header chooses the *kind* of key
  and each kind has exactly one source: HS256 is verified with the local secret
  and nothing else, RS256/ES256 with the configured PEM public key or JWKS file
  and nothing else. That closes the algorithm-confusion hole (RFC 8725 §2.1)
  where an HS256 token is "signed" with a public key's PEM bytes as the HMAC
  secret. ``exp`` and ``sub`` are required; ``exp``/``nbf``/``iat`` are checked
  here against an injectable clock with ``leeway`` seconds of tolerance, and
  ``aud``/``iss`` are checked when configured. As RFC 7519 §4.1.3 requires, a
  token that names an audience is refused when no audience is configured.
- **API keys** (``ffk_`` + 43 URL-safe characters). Only their SHA-256 hashes are
  stored, in a JSON file written atomically with mode 0600; the file is reread
  when it changes on disk, so keys created or revoked by another process apply
  without a restart (:mod:`gateway.apikeys`).
- **Tickets.** Browsers cannot set headers on a WebSocket handshake, so they
  fetch a short-lived single-use ticket over authenticated HTTP and put it in
  the WebSocket URL. Tickets live in memory only, in a bounded table
  (:mod:`gateway.tickets`); redeeming one checks its credential again here.

The local secret (32 random bytes, hex on disk) is created on first use with
mode 0600; a secret file readable by group or others is refused. The files
themselves (secret, PEM/JWKS keys, the API key file) are read and written by
:mod:`gateway.keyfiles`.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
import msgspec
from jwt.exceptions import InvalidSubjectError
from jwt.types import Options

from gateway.apikeys import API_KEY_PREFIX, ApiKeyInfo, ApiKeyStore
from gateway.keyfiles import (
    PublicKey,
    WatchedFile,
    load_or_create_secret,
    parse_jwks,
    parse_pem,
)
from gateway.principal import Principal, Unauthorized, checked_priority
from gateway.quotas import Quota
from gateway.scopes import ALL_SCOPES, parse_scopes
from gateway.tickets import TicketTable
from protocol.messages import MAX_PRIORITY, MIN_PRIORITY

__all__ = [
    "API_KEY_PREFIX",
    "SUPPORTED_ALGORITHMS",
    "ApiKeyInfo",
    "Authenticator",
    "Principal",
    "Unauthorized",
    "load_or_create_secret",
]

log = logging.getLogger("ferrous.auth")

SUPPORTED_ALGORITHMS = frozenset({"HS256", "RS256", "ES256"})
_MAX_TOKEN_CHARS = 16 * 1024  # far above any real token; bounds work before the signature check


def _numeric_claim(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized(f"invalid {name} claim")
    try:
        number = float(value)
    except OverflowError:
        raise Unauthorized(f"invalid {name} claim") from None
    if not math.isfinite(number):
        raise Unauthorized(f"invalid {name} claim")
    return number


# -- the authenticator ------------------------------------------------------------------------


class Authenticator:
    """Turns a credential into a :class:`Principal` or raises :class:`Unauthorized`.

    Relative file names resolve against ``home``. With ``enabled=False`` every
    caller is the local principal and no key file is read until a token or API
    key is issued. Configuration errors (unsupported algorithm, unreadable key
    file, loose secret permissions) raise :class:`ValueError` at construction.
    Safe to call from several threads.
    """

    def __init__(
        self,
        *,
        home: Path,
        enabled: bool = True,
        secret_file: str = "",
        algorithms: Sequence[str] = ("HS256",),
        public_key_file: str = "",
        jwks_file: str = "",
        audience: str = "",
        issuer: str = "",
        leeway: float = 30.0,
        tenant_claim: str = "tenant",
        api_keys_file: str = "",
        ticket_ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
        max_tickets: int = 100_000,
        max_tickets_per_user: int = 32,
        max_token_lifetime: float = 0.0,
    ) -> None:
        if isinstance(algorithms, str):
            algorithms = (algorithms,)
        unsupported = sorted(set(algorithms) - SUPPORTED_ALGORITHMS)
        if unsupported:
            raise ValueError(
                f"unsupported JWT algorithm(s) {', '.join(unsupported)}; "
                f"choose from {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )
        if enabled and not algorithms:
            raise ValueError("auth is enabled but no JWT algorithm is allowed")
        if leeway < 0 or not math.isfinite(leeway):
            raise ValueError("leeway must be a non-negative number of seconds")
        if ticket_ttl <= 0 or not math.isfinite(ticket_ttl):
            raise ValueError("ticket_ttl must be a positive number of seconds")
        if max_tickets < 1 or max_tickets_per_user < 1:
            raise ValueError("max_tickets and max_tickets_per_user must be at least 1")
        if max_token_lifetime < 0 or not math.isfinite(max_token_lifetime):
            raise ValueError("max_token_lifetime must be a non-negative number of seconds")
        if not tenant_claim:
            raise ValueError("tenant_claim must not be empty")
        asymmetric = sorted(set(algorithms) - {"HS256"})
        if enabled and asymmetric and not (public_key_file or jwks_file):
            raise ValueError(f"{', '.join(asymmetric)} needs public_key_file or jwks_file")

        def resolve(name: str, default: str) -> Path:
            return home / Path(name or default).expanduser()

        self._enabled = enabled
        self._algorithms = frozenset(algorithms)
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = float(leeway)
        self._tenant_claim = tenant_claim
        self._max_lifetime = float(max_token_lifetime)
        self._clock = clock
        self._lock = threading.Lock()

        self._secret_path = resolve(secret_file, "secret")
        self._secret: bytes | None = None
        key_file = WatchedFile[list[PublicKey]]
        self._pem = key_file(resolve(public_key_file, ""), parse_pem, [])
        self._jwks = key_file(resolve(jwks_file, ""), parse_jwks, [])
        self._has_pem = bool(public_key_file)
        self._has_jwks = bool(jwks_file)
        self._api_keys = ApiKeyStore(resolve(api_keys_file, "api_keys.json"), clock=clock)
        self._tickets = TicketTable(
            ttl=float(ticket_ttl),
            max_tickets=max_tickets,
            max_per_user=max_tickets_per_user,
            clock=clock,
        )
        # Set by the gateway: whether a principal's credential was revoked (gateway.credentials).
        self.revocations: Callable[[Principal], bool] | None = None

        if enabled:
            if "HS256" in self._algorithms:
                self._local_secret()
            for watched, configured in ((self._pem, self._has_pem), (self._jwks, self._has_jwks)):
                if configured:
                    try:
                        watched.load(strict=True)
                    except (OSError, ValueError) as exc:
                        raise ValueError(f"cannot use {watched.path}: {exc}") from None

    @property
    def enabled(self) -> bool:
        return self._enabled

    # -- credentials ----------------------------------------------------------------------

    def authenticate(self, credential: str | None) -> Principal:
        """The principal for a JWT or an API key (``ffk_…``)."""
        if not self._enabled:
            # Auth off is allowed on loopback only: the caller is the machine's owner.
            return Principal("local", None, "none", None, ALL_SCOPES)
        if not credential:
            raise Unauthorized("missing token")
        if credential.startswith(API_KEY_PREFIX):
            principal = self._api_keys.authenticate(credential)
        else:
            principal = self._authenticate_jwt(credential)
        self.check_not_revoked(principal)
        return principal

    def check_not_revoked(self, principal: Principal) -> None:
        """Raise ``Unauthorized`` when ``principal``'s credential is on the revocation list."""
        if self.revocations is not None and self.revocations(principal):
            kind = "API key" if principal.key_id is not None else "token"
            raise Unauthorized(f"this {kind} was revoked")

    def _local_secret(self) -> bytes:
        with self._lock:
            if self._secret is None:
                self._secret = load_or_create_secret(self._secret_path)
            return self._secret

    def _verification_keys(self, alg: str, header: dict[str, Any]) -> list[Any]:
        if alg == "HS256":
            return [self._local_secret()]
        with self._lock:
            pem = self._pem.load(strict=False) if self._has_pem else []
            jwks = self._jwks.load(strict=False) if self._has_jwks else []
        kid = header.get("kid")
        if kid is not None and self._has_jwks:
            by_kid = [k.key for k in jwks if k.kid == kid and k.alg == alg]
            if not by_kid:
                raise Unauthorized("unknown key id")
            return by_kid
        keys = [k.key for k in pem if k.alg == alg]
        if kid is None:
            keys += [k.key for k in jwks if k.alg == alg]
        if not keys:
            raise Unauthorized("no key for algorithm")
        return keys

    def _authenticate_jwt(self, token: str) -> Principal:
        if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 2 or not token.isascii():
            raise Unauthorized("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthorized("algorithm not allowed")

        options: Options = {
            "verify_signature": True,
            "require": ["exp", "sub"],
            # Times are checked below against self._clock; pyjwt reads time.time().
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": True,
            "verify_iss": self._issuer is not None,
            "verify_sub": True,
            "verify_jti": True,
            "strict_aud": False,
            "enforce_minimum_key_length": True,
        }
        payload: dict[str, Any] | None = None
        for key in self._verification_keys(alg, header):
            try:
                decoded = jwt.decode_complete(
                    token,
                    key,
                    algorithms=[alg],
                    options=options,
                    audience=self._audience,
                    issuer=self._issuer,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as exc:
                reason = {"aud": "wrong audience", "iss": "wrong issuer"}
                raise Unauthorized(reason.get(exc.claim, f"missing {exc.claim} claim")) from None
            except jwt.InvalidAudienceError:
                raise Unauthorized("wrong audience") from None
            except jwt.InvalidIssuerError:
                raise Unauthorized("wrong issuer") from None
            except jwt.InvalidAlgorithmError:
                raise Unauthorized("algorithm not allowed") from None
            except InvalidSubjectError:
                raise Unauthorized("invalid sub claim") from None
            except jwt.DecodeError:
                raise Unauthorized("malformed token") from None
            except jwt.PyJWTError:
                raise Unauthorized("invalid token") from None
            payload = decoded["payload"]
            break
        if payload is None:
            raise Unauthorized("bad signature")

        now = self._clock()
        exp = _numeric_claim(payload, "exp")
        nbf = _numeric_claim(payload, "nbf")
        iat = _numeric_claim(payload, "iat")
        if exp is None or exp <= now - self._leeway:
            raise Unauthorized("token expired")
        if nbf is not None and nbf > now + self._leeway:
            raise Unauthorized("token not yet valid")
        if iat is not None and iat > now + self._leeway:
            raise Unauthorized("token issued in the future")
        if self._max_lifetime and exp - min(now, iat or now) > self._max_lifetime + self._leeway:
            # A long-lived token is a standing credential: cap it as the operator asks.
            raise Unauthorized("token lifetime exceeds the maximum")
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("invalid sub claim")
        tenant = payload.get(self._tenant_claim)
        if tenant is not None and (not isinstance(tenant, str) or not tenant.strip()):
            # An empty tenant would fall into the shared namespace: refuse it outright.
            raise Unauthorized(f"invalid {self._tenant_claim} claim")
        raw_scopes = payload.get("scope", payload.get("scopes"))
        try:
            scopes = parse_scopes(raw_scopes)
        except ValueError:
            raise Unauthorized("invalid scope claim") from None
        priority = payload.get("priority", 0)
        if (
            not isinstance(priority, int)
            or isinstance(priority, bool)
            or not MIN_PRIORITY <= priority <= MAX_PRIORITY
        ):
            raise Unauthorized("invalid priority claim")
        quota = payload.get("quota")
        if quota is not None:
            try:
                quota = msgspec.convert(quota, Quota)
            except msgspec.ValidationError:
                raise Unauthorized("invalid quota claim") from None
        jti = payload.get("jti")
        token_id = jti if isinstance(jti, str) and 0 < len(jti) <= 128 else None
        return Principal(
            sub, tenant, "jwt", exp, scopes, max_priority=priority, quota=quota, token_id=token_id
        )

    def issue_token(
        self,
        sub: str = "local",
        tenant: str | None = None,
        ttl: float = 3600.0,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        scopes: frozenset[str] | None = None,
        priority: int = 0,
        quota: Quota | None = None,
    ) -> str:
        """An HS256 JWT signed with the local secret.

        Carries ``sub``, ``iat``, ``nbf``, ``exp``, the tenant claim when
        ``tenant`` is set, ``scope`` when ``scopes`` is given (else the token
        gets the default scopes), and ``aud``/``iss`` (the arguments, else the
        configured values, omitted when both are empty).
        """
        if not sub:
            raise ValueError("sub must not be empty")
        if ttl <= 0 or not math.isfinite(ttl):
            raise ValueError("ttl must be a positive number of seconds")
        now = self._clock()
        claims: dict[str, Any] = {
            "sub": sub,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_urlsafe(12),  # what revokes it early
        }
        if tenant:
            claims[self._tenant_claim] = tenant
        if scopes is not None:
            claims["scope"] = " ".join(sorted(parse_scopes(sorted(scopes))))
        if priority:
            claims["priority"] = checked_priority(priority)
        if quota is not None:
            claims["quota"] = msgspec.to_builtins(quota)
        aud = audience if audience is not None else self._audience
        if aud:
            claims["aud"] = aud
        iss = issuer if issuer is not None else self._issuer
        if iss:
            claims["iss"] = iss
        return jwt.encode(claims, self._local_secret(), algorithm="HS256")

    # -- tickets --------------------------------------------------------------------------

    def issue_ticket(self, principal: Principal) -> str:
        """A single-use ticket worth ``principal`` for ``ticket_ttl`` seconds.

        The ticket never outlives the credential it was issued for.
        """
        return self._tickets.issue(principal)

    def ticket_terms(self, principal: Principal) -> tuple[float, float]:
        """When a ticket issued now for ``principal`` is forgotten, and when it expires."""
        return self._tickets.terms(principal)

    def redeemed(self, principal: Principal, expires_at: float) -> Principal:
        """The principal a ticket of ``principal`` stands for once redeemed, checked."""
        if expires_at <= self._clock():
            raise Unauthorized("ticket expired")
        p = principal
        if p.key_id is not None and p.key_id not in self.key_ids():
            raise Unauthorized("the API key behind this ticket was revoked")
        self.check_not_revoked(p)
        return msgspec.structs.replace(p, method="ticket")

    def redeem_ticket(self, ticket: str) -> Principal:
        """The principal a ticket was issued for; the ticket is spent either way."""
        entry = self._tickets.take(ticket)
        return self.redeemed(entry.principal, entry.expires_at)

    # -- API keys -------------------------------------------------------------------------

    @property
    def api_keys(self) -> ApiKeyStore:
        """The stored API keys: create, revoke and list them here."""
        return self._api_keys

    def key_ids(self) -> frozenset[str]:
        """The prefixes of the API keys that exist now (the key file is reread when it changed).

        Sessions opened with a key whose prefix is no longer here are closed,
        and tickets minted for it are refused.
        """
        return self._api_keys.key_ids()
