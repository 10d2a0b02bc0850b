"""Fuzzing the HTTP surfaces of a live gateway: generated and mutated bodies and headers.

``tests/test_http_hostile.py`` sends a fixed list of bad bodies; this goes
further. Bodies start from each route's own request Struct (strategies derived
by ``msgspec.inspect``, as in ``test_fuzz_protocol``), valid or not, then get
mutated: structurally (a field dropped, added, of the wrong type, nested
deeply, a huge number, a string that is not UTF-8) or byte by byte, or sent
to the wrong route. Headers vary too: bad or missing content types, missing,
malformed, foreign or huge credentials, huge and many headers, bytes that are
not UTF-8, a declared body size over the limit. Each answer must be below 500,
and an answer of 400 or more must be a JSON body with an ``error``. A few
requests that break HTTP itself go over a raw socket: uvicorn refuses those
before the app sees them, with a plain-text 400, which is fine.

Afterwards ``/healthz`` and a normal generation still work, and the server
logged no traceback. Run with ``-s`` for the tallies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway import generate_routes, model_routes, ollama, ollama_models, openai_api, responses_api
from gateway.auth import load_or_create_secret
from gateway.config import LimitsConfig
from gateway.server import RunningServer

from .fuzzing import mutate_bytes
from .gateway_helpers import gateway, server_config
from .test_fuzz_live import Records, records  # noqa: F401  (the fixture)
from .test_fuzz_protocol import json_values, strategy_for

MAX_BODY = 64 * 1024  # limits.max_body_bytes: bodies over it get 413
EXAMPLES_PER_ROUTE = 30
REQUESTS_PER_EXAMPLE = 4  # variations (body kind, headers) of one drawn body
CONCURRENCY = 16

ROUTES: dict[str, type[msgspec.Struct] | None] = {
    "/v1/generate": generate_routes.GenerateBody,
    "/v1/chat": generate_routes.ChatBody,
    "/v1/models/pull": model_routes.PullBody,
    "/v1/models/copy": model_routes.CopyBody,
    "/v1/models/create": model_routes.CreateBody,
    "/v1/models/unload": model_routes.ModelBody,
    "/v1/tickets": None,  # no body; credentials only
    "/v1/chat/completions": openai_api.ChatCompletionRequest,
    "/v1/completions": openai_api.CompletionRequest,
    "/v1/embeddings": openai_api.EmbeddingsRequest,
    "/v1/responses": responses_api.ResponsesRequest,
    "/api/generate": ollama.GenerateBody,
    "/api/chat": ollama.ChatBody,
    "/api/embed": ollama.EmbedBody,
    "/api/embeddings": ollama.LegacyEmbedBody,
    "/api/show": ollama_models.NameBody,
    "/api/pull": ollama_models.PullBody,
    "/api/copy": ollama_models.CopyBody,
    "/api/create": ollama_models.CreateBody,
}

# Faults outside the project's code (a dependency's) would be listed here with a reproducer
# and counted rather than failed on; the one this fuzzer found (a JSON string that is not
# UTF-8 was a 500) is fixed, with its regression test at the end.
KNOWN_500: dict[str, str] = {}


@dataclasses.dataclass
class Request:
    route: str
    kind: str  # how the body was made
    headers_kind: str  # how the headers were made
    body: bytes
    headers: list[tuple[bytes, bytes]]


# -- bodies -------------------------------------------------------------------------------------


def _tame(body: Any, rng: random.Random) -> Any:
    """Point some requests at the real model, cheaply; keep context sizes sane."""
    if not isinstance(body, dict):
        return body
    if "model" in body:
        body["model"] = rng.choice(["eos", "eos", "nope", "eos:latest", body["model"]])
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = min(body[key], 8)
    messages = body.get("messages")
    if isinstance(messages, list) and rng.random() < 0.5:  # free-form roles are rarely valid
        for turn in messages:
            if isinstance(turn, dict):
                turn["role"] = rng.choice(["user", "user", "system", "assistant"])
    options = body.get("options")
    if isinstance(options, dict):
        if isinstance(options.get("num_ctx"), int):
            options["num_ctx"] = min(options["num_ctx"], 2048)  # a real allocation per worker
        if isinstance(options.get("num_predict"), int):
            options["num_predict"] = min(options["num_predict"], 8)
        if isinstance(options.get("max_tokens"), int):
            options["max_tokens"] = min(options["max_tokens"], 8)
    return body


_SPECIALS = b'\x00\x7f\x80\xc0\xff"\\{}[]:,0-e.'


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    return mutate_bytes(data, rng, _SPECIALS)


HUGE_NUMBERS = ["1e999", "-1e999", "9" * 400, "-" + "9" * 30, "1e-400", "NaN", "Infinity", "-0"]
NOT_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe4\xbd", b"\xf8\x88\x80\x80\x80"]


def _structural(body: dict[str, Any], rng: random.Random, extra: Any) -> bytes:
    """One structural mutation of a valid body, encoded; the hole trick puts raw text in."""
    hole = "\x00hole\x00"
    raw: bytes | None = None
    op = rng.choice(["drop", "unknown", "wrong", "deep", "huge", "not_utf8", "null_all"])
    key = rng.choice(list(body)) if body else "model"
    if op == "drop" and body:
        body.pop(key)
    elif op == "unknown":
        body["surprise_" + str(rng.randrange(100))] = extra
    elif op == "wrong":
        body[key] = rng.choice([[None], {"a": []}, "x", 1.5, True, -1, ""])
    elif op == "deep":
        depth = rng.choice([rng.randint(1, 200), rng.randint(900, 1100), rng.randint(1, 20_000)])
        body[key] = hole
        open_, close = rng.choice([("[", "]"), ('{"a":', "}")])
        raw = (open_ * depth + "1" + close * depth).encode()
    elif op == "huge":
        body[key] = hole
        raw = rng.choice(HUGE_NUMBERS).encode()
    elif op == "not_utf8":
        body[key] = hole
        raw = b'"ab' + rng.choice(NOT_UTF8) + b'cd"'
    else:
        body = {k: None for k in body}
    data = msgspec.json.encode(body)
    if raw is not None:
        data = data.replace(msgspec.json.encode(hole), raw)
    return data


def _body(route: str, value: Any, other: Any, extra: Any, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(
        [
            "valid",
            "valid",
            "structural",
            "structural",
            "structural",
            "bytes",
            "bytes",
            "other_route",
            "json_value",
            "random",
            "empty",
            "oversize",
            "stream",
        ]
    )
    if kind == "valid":
        return kind, msgspec.json.encode(value)
    if kind == "structural" and isinstance(value, dict):
        return kind, _structural(dict(value), rng, extra)
    if kind == "bytes":
        return kind, _mutate_bytes(msgspec.json.encode(value), rng)
    if kind == "other_route":
        return kind, msgspec.json.encode(other)
    if kind == "json_value":
        return kind, msgspec.json.encode(extra)
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 300))
    if kind == "empty":
        return kind, rng.choice([b"", b" ", b"\n\t", b"{}", b"null"])
    if kind == "oversize":
        pad = "x" * rng.randint(MAX_BODY, 2 * MAX_BODY)
        body = dict(value) if isinstance(value, dict) else {}
        body["prompt"] = pad
        return kind, msgspec.json.encode(body)
    body = dict(value) if isinstance(value, dict) else {}
    body["stream"] = True  # a streaming answer must still be whole (or a clean error)
    return "stream", msgspec.json.encode(body)


# -- headers ------------------------------------------------------------------------------------


def _headers(token: str, expired: str, rng: random.Random) -> tuple[str, list[tuple[bytes, bytes]]]:
    auth = f"Bearer {token}".encode()
    ct = (b"content-type", b"application/json")
    kind = rng.choice(
        [
            "normal",
            "normal",
            "normal",
            "content_type",
            "no_auth",
            "bad_auth",
            "huge_header",
            "many_headers",
            "not_utf8",
            "length_over_limit",
            "proxy",
        ]
    )
    headers: list[tuple[bytes, bytes]] = [(b"authorization", auth), ct]
    if kind == "content_type":
        headers[1] = (
            b"content-type",
            rng.choice(
                [
                    b"text/plain",
                    b"application/x-www-form-urlencoded",
                    b"multipart/form-data; boundary=zzz",
                    b"application/json; charset=latin-1",
                    b"application/msgpack",
                    b"",
                    b"\xff/\xfe",
                ]
            ),
        )
    elif kind == "no_auth":
        headers = [ct]
    elif kind == "bad_auth":
        value = rng.choice(
            [
                b"Bearer",
                b"Bearer \tx",
                b"Bearer " + rng.randbytes(40).hex().encode(),
                b"Basic dXNlcjpwYXNz",
                b"Bearer " + expired.encode(),
                b"Bearer " + token.encode()[:-3] + b"abc",  # a bad signature
                b"Bearer ffk_" + b"A" * 43,
                b"Bearer " + b"e" * 16_000,
                b"Bearer a.b.c",
                b"Bearer eyJ" + rng.randbytes(30).hex().encode() + b".eyJ.sig",
                b"bearer " + token.encode(),
                b"Bearer\t" + token.encode(),
            ]
        )
        headers = [(b"authorization", value), ct]
        if rng.random() < 0.3:
            headers.append((b"x-api-key", rng.choice([b"", b"ffk_nope", b"\xff\xfe"])))
        if rng.random() < 0.2:
            headers.append((b"authorization", auth))  # a second, valid one
    elif kind == "huge_header":
        headers.append((b"x-padding", b"p" * rng.randint(8_000, 60_000)))
    elif kind == "many_headers":
        headers += [(f"x-h{i}".encode(), b"v") for i in range(rng.randint(100, 400))]
    elif kind == "not_utf8":
        headers[0] = (b"authorization", b"Bearer \xff\xfe" + token.encode()[2:])
        headers.append((b"x-api-key", b"\xc0\x80\xed\xa0\x80"))
        headers.append((b"user-agent", b"fuzz/\xff"))
    elif kind == "length_over_limit":
        # The caller replaces the body with one over max_body_bytes: Content-Length says so,
        # and the server must answer 413 without reading it.
        headers.append((b"x-note", b"length over limit"))
    elif kind == "proxy":
        headers.append((b"forwarded", b"for=203.0.113.9"))
        headers.append((b"x-forwarded-for", b"203.0.113.9, \xff"))
    return kind, headers


# -- the corpus ---------------------------------------------------------------------------------


def build_requests(token: str, expired: str) -> list[Request]:
    """Every request: bodies drawn by Hypothesis (derandomized), mutated by seeded Randoms."""
    out: list[Request] = []
    pool: list[Any] = [{}]  # bodies drawn for earlier routes, sent to the wrong route

    def draw_route(route: str, strategy: st.SearchStrategy[Any]) -> None:
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(value=strategy, extra=json_values, seed=st.integers(0, 2**32 - 1))
        def draw(value: Any, extra: Any, seed: int) -> None:
            # Hypothesis favours small seeds (0 often): mix in the position so that no two
            # requests share a Random, while the corpus stays the same from run to run.
            rng = random.Random(f"{route}:{len(out)}:{seed}")
            pool.append(value)
            for _ in range(REQUESTS_PER_EXAMPLE):
                body_value = _tame(msgspec.json.decode(msgspec.json.encode(value)), rng)
                kind, body = _body(route, body_value, rng.choice(pool), extra, rng)
                headers_kind, headers = _headers(token, expired, rng)
                if headers_kind == "length_over_limit":
                    body = b'{"model":"eos","prompt":"' + b"x" * (MAX_BODY + 1) + b'"}'
                out.append(Request(route, kind, headers_kind, body, headers))

        draw()

    for route, body_type in ROUTES.items():
        strategy = (
            strategy_for(mi.type_info(body_type)).map(msgspec.to_builtins)
            if body_type is not None
            else st.just({})
        )
        draw_route(route, strategy)
    return out


# -- running it ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    requests: int = 0
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_headers: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    per_route: dict[str, collections.Counter[int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    known: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)


def _has_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("error"))


def _known_500(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    text = msgspec.json.encode(body).decode()
    return next((name for name, msg in KNOWN_500.items() if msg in text), None)


async def send_all(srv: RunningServer, reqs: list[Request], tally: Tally) -> None:
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=60) as c:
            while not queue.empty():
                req = queue.get_nowait()
                try:
                    resp = await c.post(req.route, content=req.body, headers=req.headers)
                except httpx.HTTPError as exc:
                    tally.problems.append(f"{req.route} {req.kind}/{req.headers_kind}: {exc!r}")
                    continue
                tally.requests += 1
                tally.statuses[resp.status_code] += 1
                tally.by_kind[req.kind] += 1
                tally.by_headers[req.headers_kind] += 1
                tally.per_route[req.route][resp.status_code] += 1
                bad = resp.status_code >= 500 or (resp.status_code >= 400 and not _has_error(resp))
                if bad and resp.status_code == 500 and (known := _known_500(resp)):
                    tally.known[known] += 1
                elif bad:
                    tally.problems.append(
                        f"{req.route} {req.kind}/{req.headers_kind} {req.body[:80]!r}: "
                        f"{resp.status_code} {resp.text[:200]!r}"
                    )

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


RAW_REQUESTS: dict[str, bytes] = {
    "nul_in_header": b"POST {route} HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "no_colon": b"POST {route} HTTP/1.1\r\nHost: x\r\nNoColonHere\r\nContent-Length: 2\r\n\r\n{}",
    "bad_length": b"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
    "two_lengths": b"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    "length_and_chunked": b"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "bad_chunk": b"POST {route} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "path_not_utf8": b"POST {route}\xff\xfe HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "space_in_name": b"POST {route} HTTP/1.1\r\nHost: x\r\nBad Name: v\r\nContent-Length: 2\r\n\r\n{}",
    "header_1mb": b"POST {route} HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"b" * 1_000_000
    + b"\r\nContent-Length: 2\r\n\r\n{}",
    "auth_trailing_space": b"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "http_0_9": b"POST {route}\r\n\r\n",
    "bad_version": b"POST {route} HTTP/7.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
}


async def raw_request(srv: RunningServer, data: bytes) -> tuple[int, bytes]:
    """One request over a plain socket; the status (0: closed without answer) and body."""
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status = int(head.split(b" ", 2)[1])
    return status, head


@pytest.mark.timeout(180)
async def test_generated_and_mutated_http_requests_never_get_a_5xx(
    tmp_path: Path,
    eos_model: Path,
    records: Records,  # noqa: F811
) -> None:
    config = server_config(
        tmp_path,
        {"eos": eos_model},
        limits=LimitsConfig(max_body_bytes=MAX_BODY),
        allow_remote_pull=False,
        auto_pull=False,
    )
    tally = Tally()
    async with gateway(config) as srv:
        token = srv.gateway.auth.issue_token(sub="fuzzer", ttl=3600)
        now = int(time.time())
        expired = jwt.encode(
            {"sub": "fuzzer", "exp": now - 3600, "iat": now - 7200},
            load_or_create_secret(tmp_path / "secret"),
            algorithm="HS256",
        )
        t0 = time.perf_counter()
        reqs = build_requests(token, expired)
        t_build = time.perf_counter() - t0
        t1 = time.perf_counter()
        await send_all(srv, reqs, tally)
        raw: collections.Counter[str] = collections.Counter()
        for route in ROUTES:
            for name, template in RAW_REQUESTS.items():
                status, head = await raw_request(srv, template.replace(b"{route}", route.encode()))
                raw[f"{status}"] += 1
                tally.requests += 1
                if status >= 500:
                    tally.problems.append(f"raw {name} on {route}: {head[:200]!r}")
        t_send = time.perf_counter() - t1

        # The server is whole afterwards.
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as c:
            health = await c.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            r = await c.post(
                "/v1/generate",
                json={"model": "eos", "prompt": "hi", "options": {"temperature": 0}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200 and r.json()["text"] == "Done."
    gc.collect()  # unretrieved task exceptions are logged when their task is collected

    known_records = [
        r
        for r in records.records
        if r.name == "ferrous.http"
        and r.exc_info
        and isinstance(r.exc_info[1], UnicodeDecodeError)
        and tally.known
    ]
    faults = [
        r
        for r in records.records
        if r not in known_records
        and (r.levelno >= logging.ERROR or r.exc_info or "Traceback" in r.getMessage())
    ]
    print(
        f"\n[fuzz-http] {tally.requests} requests ({len(reqs)} generated over {len(ROUTES)} routes,"
        f" {tally.requests - len(reqs)} raw) in {t_send:.1f} s (corpus built in {t_build:.1f} s)"
        f"\n[fuzz-http] statuses: {dict(sorted(tally.statuses.items()))}"
        f"\n[fuzz-http] raw-socket statuses (0 = closed): {dict(raw)}"
        f"\n[fuzz-http] bodies by kind: {dict(sorted(tally.by_kind.items()))}"
        f"\n[fuzz-http] headers by kind: {dict(sorted(tally.by_headers.items()))}"
        f"\n[fuzz-http] per route: "
        + "".join(
            f"\n    {k}: {dict(sorted(v.items()))}" for k, v in sorted(tally.per_route.items())
        )
        + f"\n[fuzz-http] known faults (reported, see KNOWN_500): {dict(tally.known)}"
    )
    assert tally.problems == [], "\n".join(tally.problems[:30])
    assert [(r.name, r.getMessage(), r.exc_info) for r in faults] == []


async def test_a_json_string_that_is_not_utf8_is_a_400(tmp_path: Path, eos_model: Path) -> None:
    async with gateway(server_config(tmp_path, {"eos": eos_model})) as srv:
        token = srv.gateway.auth.issue_token(sub="a", ttl=600)
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as c:
            r = await c.post(
                "/v1/generate",
                content=b'{"model": "eos", "prompt": "\xff"}',
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
    assert r.status_code == 400, (r.status_code, r.text)
