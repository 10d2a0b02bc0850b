"""The authenticator: JWT validation, API keys, tickets and the local secret, with real keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth import Authenticator, Principal, Unauthorized, load_or_create_secret
from gateway.scopes import ALL_SCOPES
from protocol.errors import ErrorCode

NOW = 1_700_000_000.0
OTHER_SECRET = b"an unrelated secret of at least thirty-two bytes!!"


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rsa_pem(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "rsa.pem"
    path.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def jwks(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
    ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    return path


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def local_secret(home: Path) -> bytes:
    return load_or_create_secret(home / "secret")


def refused(auth: Authenticator, credential: str | None) -> str:
    with pytest.raises(Unauthorized) as info:
        auth.authenticate(credential)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    return info.value.message


# -- issued tokens and the local secret ---------------------------------------------------------


def test_issued_token_authenticates_as_its_subject_and_tenant(
    tmp_path: Path, clock: FakeClock
) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    token = auth.issue_token("alice", tenant="acme", ttl=120)
    principal = auth.authenticate(token)
    assert principal.token_id  # every issued token has a jti, to revoke it by
    assert principal == Principal("alice", "acme", "jwt", NOW + 120, token_id=principal.token_id)
    other = auth.authenticate(auth.issue_token("alice", tenant="acme", ttl=120))
    assert other.token_id != principal.token_id
    default = auth.authenticate(auth.issue_token())
    assert msgspec.structs.replace(default, token_id=None) == Principal(
        "local", None, "jwt", NOW + 3600
    )


def test_issued_token_carries_configured_audience_and_issuer(
    tmp_path: Path, clock: FakeClock
) -> None:
    auth = Authenticator(
        home=tmp_path, audience="ferrous", issuer="https://id.example", clock=clock
    )
    token = auth.issue_token("bob", tenant="t1")
    payload = jwt.decode(
        token, local_secret(tmp_path), algorithms=["HS256"], audience="ferrous",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )  # fmt: skip
    assert payload["aud"] == "ferrous"
    assert payload["iss"] == "https://id.example"
    assert payload["tenant"] == "t1"
    assert auth.authenticate(token).user == "bob"
    assert refused(auth, auth.issue_token("bob", audience="elsewhere")) == "wrong audience"


def test_secret_file_is_private_and_reused_across_instances(
    tmp_path: Path, clock: FakeClock
) -> None:
    first = Authenticator(home=tmp_path, clock=clock)
    secret_path = tmp_path / "secret"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(secret_path.read_text().strip())) == 32
    token = first.issue_token("alice")
    second = Authenticator(home=tmp_path, clock=clock)
    assert second.authenticate(token).user == "alice"
    assert load_or_create_secret(secret_path) == bytes.fromhex(secret_path.read_text())


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret_path = tmp_path / "secret"
    load_or_create_secret(secret_path)
    os.chmod(secret_path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_or_create_secret(secret_path)
    with pytest.raises(ValueError, match="chmod 600"):
        Authenticator(home=tmp_path)


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("credential", [None, ""])
def test_missing_credential_is_refused(tmp_path: Path, credential: str | None) -> None:
    assert refused(Authenticator(home=tmp_path), credential) == "missing token"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "a.b",
        "a.b.c.d",
        "!!!.e30.c2ln",
        f"{b64(b'not json')}.{b64(b'{}')}.c2ln",
        f"{b64(b'[1, 2]')}.{b64(b'{}')}.c2ln",
        "eyJhbGciOiJIUzI1NiJ9.ünïcode.c2ln",
    ],
)
def test_malformed_token_is_refused(tmp_path: Path, token: str) -> None:
    assert refused(Authenticator(home=tmp_path), token) == "malformed token"


def test_token_signed_with_another_secret_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    forged = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
    assert refused(auth, forged) == "bad signature"
    header, _, sig = auth.issue_token("alice").split(".")
    tampered = f"{header}.{b64(json.dumps(claims(sub='root')).encode())}.{sig}"
    assert refused(auth, tampered) == "bad signature"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(NOW) - 3600}, "token expired"),
        ({"nbf": int(NOW) + 3600}, "token not yet valid"),
        ({"iat": int(NOW) + 3600, "nbf": None}, "token issued in the future"),
        ({"exp": None}, "missing exp claim"),
        ({"sub": None}, "missing sub claim"),
        ({"exp": "tomorrow"}, "invalid exp claim"),
        ({"tenant": 7}, "invalid tenant claim"),
    ],
)
def test_invalid_claims_are_refused(
    tmp_path: Path, clock: FakeClock, overrides: dict[str, Any], reason: str
) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    token = jwt.encode(claims(**overrides), local_secret(tmp_path), algorithm="HS256")
    assert refused(auth, token) == reason


def test_audience_and_issuer_are_checked_when_configured(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, audience="ferrous", issuer="https://id", clock=clock)
    secret = local_secret(tmp_path)

    def token(**overrides: Any) -> str:
        return jwt.encode(claims(aud="ferrous", iss="https://id") | overrides, secret, "HS256")

    assert auth.authenticate(token()).user == "alice"
    assert auth.authenticate(token(aud=["other", "ferrous"])).user == "alice"
    assert refused(auth, token(aud="other")) == "wrong audience"
    assert refused(auth, jwt.encode(claims(iss="https://id"), secret, "HS256")) == "wrong audience"
    assert refused(auth, token(iss="https://evil")) == "wrong issuer"
    assert refused(auth, jwt.encode(claims(aud="ferrous"), secret, "HS256")) == "wrong issuer"


def test_token_for_an_audience_is_refused_when_none_is_configured(
    tmp_path: Path, clock: FakeClock
) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    token = jwt.encode(claims(aud="someone-else"), local_secret(tmp_path), algorithm="HS256")
    assert refused(auth, token) == "wrong audience"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_unsigned_token_is_refused(tmp_path: Path, clock: FakeClock, alg: str) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    token = hand_built({"alg": alg, "typ": "JWT"}, claims(), key=None)
    assert refused(auth, token) == "algorithm not allowed"


def test_unsupported_algorithms_cannot_be_configured(tmp_path: Path) -> None:
    for algorithms in (["none"], ["HS512"], ["RS256", "PS256"]):
        with pytest.raises(ValueError, match="unsupported JWT algorithm"):
            Authenticator(home=tmp_path, algorithms=algorithms)
    with pytest.raises(ValueError, match="public_key_file or jwks_file"):
        Authenticator(home=tmp_path, algorithms=["RS256"])


def test_unusable_public_keys_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot use"):
        Authenticator(home=tmp_path, algorithms=["RS256"], public_key_file="missing.pem")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = tmp_path / "weak.pem"
    pem.write_bytes(weak.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    with pytest.raises(ValueError, match="at least 2048 bits"):
        Authenticator(home=tmp_path, algorithms=["RS256"], public_key_file=str(pem))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match="no RS256 or ES256"):
        Authenticator(home=tmp_path, algorithms=["ES256"], jwks_file="jwks.json")


def test_hs256_token_keyed_with_the_rsa_public_pem_is_refused(
    tmp_path: Path, clock: FakeClock, rsa_key: rsa.RSAPrivateKey, rsa_pem: Path
) -> None:
    auth = Authenticator(
        home=tmp_path, algorithms=["HS256", "RS256"], public_key_file=str(rsa_pem), clock=clock
    )
    confused = hand_built({"alg": "HS256", "typ": "JWT"}, claims(), key=rsa_pem.read_bytes())
    assert refused(auth, confused) == "bad signature"
    # Both legitimate kinds still work on the same authenticator.
    assert auth.authenticate(jwt.encode(claims(), rsa_key, algorithm="RS256")).method == "jwt"
    assert auth.authenticate(auth.issue_token("alice")).user == "alice"


def test_rs256_token_verified_with_the_pem_public_key(
    tmp_path: Path,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    rsa_pem: Path,
) -> None:
    auth = Authenticator(
        home=tmp_path, algorithms=["RS256"], public_key_file=str(rsa_pem), clock=clock
    )
    token = jwt.encode(claims(tenant="acme"), rsa_key, algorithm="RS256")
    assert auth.authenticate(token) == Principal("alice", "acme", "jwt", NOW + 600)
    assert refused(auth, jwt.encode(claims(), other_rsa_key, algorithm="RS256")) == "bad signature"
    hs = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
    assert refused(auth, hs) == "algorithm not allowed"
    assert not (tmp_path / "secret").exists()


def test_es256_token_verified_with_the_jwks_key_named_by_kid(
    tmp_path: Path,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    jwks: Path,
) -> None:
    auth = Authenticator(
        home=tmp_path, algorithms=["RS256", "ES256"], jwks_file=str(jwks), clock=clock
    )
    es = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert auth.authenticate(es).user == "alice"
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert auth.authenticate(rs).user == "alice"
    unknown = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-2"})
    assert refused(auth, unknown) == "unknown key id"
    # The kid names an RSA key; an ES256 token cannot borrow it.
    mismatched = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    assert refused(auth, mismatched) == "unknown key id"


def test_es256_signature_by_another_key_is_refused(
    tmp_path: Path, clock: FakeClock, jwks: Path
) -> None:
    auth = Authenticator(home=tmp_path, algorithms=["ES256"], jwks_file=str(jwks), clock=clock)
    stranger = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "ec-1"})
    assert refused(auth, token) == "bad signature"


@pytest.mark.parametrize(("ago", "accepted"), [(10, True), (60, False)])
def test_leeway_tolerates_a_recent_expiry(
    tmp_path: Path, clock: FakeClock, ago: int, accepted: bool
) -> None:
    auth = Authenticator(home=tmp_path, leeway=30, clock=clock)
    token = auth.issue_token("alice", ttl=100)
    clock.now = NOW + 100 + ago
    if accepted:
        assert auth.authenticate(token).user == "alice"
    else:
        assert refused(auth, token) == "token expired"


# -- API keys -----------------------------------------------------------------------------------


def test_api_key_lifecycle_and_storage(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    key = auth.api_keys.create("carol", tenant="acme", name="laptop")
    assert key.startswith("ffk_")
    assert auth.authenticate(key) == Principal("carol", "acme", "api_key", None, key_id=key[:12])

    path = tmp_path / "api_keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = path.read_text()
    assert key not in stored
    assert key[4:] not in stored
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    [info] = auth.api_keys.stored()
    assert (info.user, info.tenant, info.name, info.created) == ("carol", "acme", "laptop", NOW)

    assert refused(auth, key[:-1] + ("A" if key[-1] != "A" else "B")) == "unknown API key"
    assert auth.api_keys.revoke(key) is True
    assert refused(auth, key) == "unknown API key"
    assert auth.api_keys.revoke(key) is False


def test_api_key_revoked_by_prefix(tmp_path: Path) -> None:
    auth = Authenticator(home=tmp_path)
    keep = auth.api_keys.create("dave")
    drop = auth.api_keys.create("erin")
    [prefix] = [i.prefix for i in auth.api_keys.stored() if i.user == "erin"]
    assert drop.startswith(prefix)
    assert auth.api_keys.revoke(prefix) is True
    assert refused(auth, drop) == "unknown API key"
    assert auth.authenticate(keep).user == "dave"


def test_api_key_file_changes_are_picked_up(tmp_path: Path) -> None:
    server = Authenticator(home=tmp_path)
    admin = Authenticator(home=tmp_path)
    assert refused(server, "ffk_" + "x" * 43) == "unknown API key"
    key = admin.api_keys.create("frank")
    assert server.authenticate(key).user == "frank"
    admin.api_keys.revoke(key)
    assert refused(server, key) == "unknown API key"


# -- tickets ------------------------------------------------------------------------------------


def test_ticket_is_single_use(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, clock=clock)
    principal = auth.authenticate(auth.issue_token("alice", tenant="acme", ttl=600))
    ticket = auth.issue_ticket(principal)
    assert auth.redeem_ticket(ticket) == Principal(
        "alice", "acme", "ticket", NOW + 600, token_id=principal.token_id
    )
    with pytest.raises(Unauthorized, match="unknown or used ticket"):
        auth.redeem_ticket(ticket)
    with pytest.raises(Unauthorized, match="unknown or used ticket"):
        auth.redeem_ticket("made-up")


def test_ticket_expires(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, ticket_ttl=30, clock=clock)
    principal = Principal("alice", None, "api_key", None)
    ticket = auth.issue_ticket(principal)
    clock.now += 31
    with pytest.raises(Unauthorized, match="ticket expired"):
        auth.redeem_ticket(ticket)
    fresh = auth.issue_ticket(principal)
    clock.now += 29
    assert auth.redeem_ticket(fresh).user == "alice"


def test_ticket_does_not_outlive_its_credential(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, ticket_ttl=30, clock=clock)
    ticket = auth.issue_ticket(Principal("alice", None, "jwt", NOW + 5))
    clock.now += 10
    with pytest.raises(Unauthorized, match="ticket expired"):
        auth.redeem_ticket(ticket)
    with pytest.raises(Unauthorized, match="token expired"):
        auth.issue_ticket(Principal("alice", None, "jwt", NOW))


def test_ticket_table_is_bounded(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, clock=clock, max_tickets=3)
    tickets = [auth.issue_ticket(Principal(user, None, "jwt", None)) for user in "abc"]
    with pytest.raises(Unauthorized, match="too many outstanding tickets"):
        auth.issue_ticket(Principal("d", None, "jwt", None))
    assert [auth.redeem_ticket(t).user for t in tickets] == ["a", "b", "c"]
    clock.now += 31  # the table frees itself as tickets expire
    auth.issue_ticket(Principal("d", None, "jwt", None))


def test_one_user_cannot_push_out_other_users_tickets(tmp_path: Path, clock: FakeClock) -> None:
    auth = Authenticator(home=tmp_path, clock=clock, max_tickets_per_user=2)
    bob = auth.issue_ticket(Principal("bob", None, "jwt", None))
    flood = [auth.issue_ticket(Principal("eve", None, "jwt", None)) for _ in range(50)]
    # Eve's own oldest tickets made room for her newest ones; Bob's is untouched.
    assert auth.redeem_ticket(bob).user == "bob"
    for spent in flood[:-2]:
        with pytest.raises(Unauthorized, match="unknown or used ticket"):
            auth.redeem_ticket(spent)
    assert [auth.redeem_ticket(t).user for t in flood[-2:]] == ["eve", "eve"]


# -- auth disabled ------------------------------------------------------------------------------


@pytest.mark.parametrize("credential", [None, "", "anything"])
def test_disabled_auth_yields_the_local_principal(tmp_path: Path, credential: str | None) -> None:
    auth = Authenticator(home=tmp_path, enabled=False)
    assert not auth.enabled  # auth off (loopback only): the caller is the local admin
    assert auth.authenticate(credential) == Principal("local", None, "none", None, ALL_SCOPES)
    assert not (tmp_path / "secret").exists()
