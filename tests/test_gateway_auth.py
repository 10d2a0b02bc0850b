"""Every bad credential is refused at the handshake: HTTP 401 with a JSON body, no upgrade."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.auth import load_or_create_secret
from gateway.config import AuthConfig
from gateway.server import RunningServer
from protocol import messages as m

from .gateway_helpers import gateway, server_config


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def server(
    tmp_path: Path, script_model: Path, rsa_key: rsa.RSAPrivateKey
) -> AsyncIterator[RunningServer]:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "rs.pem").write_bytes(pem)
    auth = AuthConfig(
        algorithms=["HS256", "RS256"],
        public_key_file=str(tmp_path / "rs.pem"),
        audience="ferrous",
        issuer="https://issuer.test",
        leeway=5.0,
    )
    config = server_config(tmp_path, {"script": script_model}, auth=auth)
    async with gateway(config) as running:
        yield running


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "mallory",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "aud": "ferrous",
        "iss": "https://issuer.test",
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _tokens(home: Path, rsa_key: rsa.RSAPrivateKey) -> dict[str, str | None]:
    secret = load_or_create_secret(home / "secret")
    now = int(time.time())
    pem_pub = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = jwt.encode(_claims(), secret, algorithm="HS256")
    return {
        "no token": None,
        "malformed": "this.is-not-a-jwt",
        "bad signature": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "expired": jwt.encode(
            _claims(exp=now - 60, iat=now - 120, nbf=now - 120), secret, algorithm="HS256"
        ),
        "not yet valid": jwt.encode(_claims(nbf=now + 120), secret, algorithm="HS256"),
        "wrong aud": jwt.encode(_claims(aud="someone-else"), secret, algorithm="HS256"),
        "wrong iss": jwt.encode(_claims(iss="https://evil.test"), secret, algorithm="HS256"),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.",
        "HS256 signed with the RS public key": _hs256_with(pem_pub, _claims()),
        "unknown API key": "ffk_" + "x" * 43,
    }


def _hs256_with(key: bytes, claims: dict[str, object]) -> str:
    import hashlib
    import hmac

    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


CASES = [
    "no token",
    "malformed",
    "bad signature",
    "expired",
    "not yet valid",
    "wrong aud",
    "wrong iss",
    "alg none",
    "HS256 signed with the RS public key",
    "unknown API key",
]


@pytest.mark.parametrize("case", CASES)
async def test_bad_credentials_are_refused_before_upgrade(
    server: RunningServer, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, case: str
) -> None:
    token = _tokens(tmp_path, rsa_key)[case]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            server.ws_url, subprotocols=[m.SUBPROTOCOL_JSON], additional_headers=headers
        ):  # type: ignore[list-item]
            pass
    response = info.value.response
    assert response.status_code == 401
    body = json.loads(response.body)
    assert body["error"]["code"] == "unauthorized" and body["error"]["message"]
    # The server keeps serving good clients.
    good = jwt.encode(_claims(), load_or_create_secret(tmp_path / "secret"), algorithm="HS256")
    async with connect(
        server.ws_url,
        subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {good}"},
    ) as ws:
        await ws.send('{"type": "hello"}')
        assert '"user":"mallory"' in str(await ws.recv())


async def test_rs256_tokens_from_the_configured_key_are_accepted(
    server: RunningServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(_claims(sub="rita", tenant="acme"), rsa_key, algorithm="RS256")
    async with connect(
        server.ws_url,
        subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        await ws.send('{"type": "hello"}')
        assert '"user":"rita"' in str(await ws.recv())


async def test_an_unknown_subprotocol_is_refused_with_400(server: RunningServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.ws_url, subprotocols=["chat.v9"]):  # type: ignore[list-item]
            pass
    assert info.value.response.status_code == 400
    assert json.loads(info.value.response.body)["error"]["code"] == "bad_request"
