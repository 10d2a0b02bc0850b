"""Idle capacity: what N authenticated idle WebSocket sessions cost `ferrous serve`, and what they do to others.

    python -m bench.idle [--sessions 10000] [--new 200] [--tokens 200] [--runs 3] [--json]

Starts ``ferrous serve`` as its own process (auth on, one worker with one
thread, a small script model whose decode steps take a few milliseconds),
mints a token with ``ferrous token`` for its FERROUS_HOME, and:

1. streams ``--tokens`` tokens ``--runs`` times on the idle server and pools
   the inter-token latencies (``itl_p99_ms_idle_server``);
2. opens ``--sessions`` sessions in parallel batches of ``--batch``, each
   upgraded with the token, ``hello`` -> ``ready``, and left idle with the
   client's WebSocket heartbeats on (``ping_interval`` 20 s; the server pings too);
3. reports the gateway's RSS (the server process only: the engine workers
   are its children and are excluded) before and after, and the difference
   per session (``gateway_rss_mb``, ``rss_per_session_kb``);
4. with the N sessions open: the same ITL measurement (``itl_p99_ms_loaded``),
   then ``--new`` new connections one after the other (connect, upgrade,
   ``hello`` -> ``ready``, close: ``handshake_p99_ms``) while another
   generation streams (``itl_p99_ms_during_handshakes``).

The timed clients run in probe processes of their own, so that the bench
process, busy with thousands of connections, does not add its own delays.
Targets: gateway RSS under 400 MB at 10 000 sessions and 1.2 GB at 50 000
(:func:`rss_target_mb`: the line through both), new handshakes p99 <= 50 ms, loaded ITL p99 within
1.5x of the idle server's. Past 25 000 sessions the connections come from
several loopback source addresses (127.0.0.1, .2, ...), so that client ports
do not run out.

The bench process needs a file descriptor per session, so it raises its own
soft limit to the hard one; the server does the same at start-up. Every wait
is bounded (``--timeout`` for the whole run); the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from bench.serving import start_server, stop_server
from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
from gateway.process_tuning import raise_fd_limit
from protocol import messages as m
from protocol.codec import codec_for

__all__ = ["main", "run"]

JSON = codec_for(m.SUBPROTOCOL_JSON)
SUBPROTOCOLS = [Subprotocol(m.SUBPROTOCOL_JSON)]
SCRIPT = "Hi ö你🙂!"
PING_INTERVAL = 20.0  # the client's WebSocket heartbeats, as a browser-less client would send


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def _ferrous(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def _mint_token(env: dict[str, str]) -> str:
    """A token for the server's local secret (created here, before the server starts)."""
    out = subprocess.run(
        _ferrous("token", "--sub", "bench", "--ttl", "7200"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


PORTS_PER_SOURCE = 25_000  # of the ~28,000 ephemeral ports one source address has


def _sources(sessions: int) -> list[str]:
    """Loopback source addresses enough for ``sessions`` connections to one server port
    (a connection is (source, source port, server, server port): one source address
    runs out of ports before 30,000)."""
    n = max(1, -(-sessions // PORTS_PER_SOURCE))
    return [f"127.0.0.{i + 1}" for i in range(n)]


async def _session(url: str, token: str, source: str | None = None) -> ClientConnection:
    ws = await connect(
        url,
        subprotocols=SUBPROTOCOLS,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_INTERVAL,
        open_timeout=30,
        max_size=None,
        **({"local_addr": (source, 0)} if source else {}),
    )
    try:
        await ws.send(JSON.encode(m.Hello(client="bench.idle")))
        ready = JSON.decode_server(await asyncio.wait_for(ws.recv(), 30))
        if not isinstance(ready, m.Ready):
            raise RuntimeError(f"expected ready, got {ready!r}")
    except BaseException:
        await ws.close()
        raise
    return ws


async def _itl(url: str, token: str, tokens: int) -> list[float]:
    """Inter-token latencies (ms) of one generation on its own session."""
    ws = await _session(url, token)
    try:
        options = m.Options(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        await ws.send(JSON.encode(m.Generate("itl", "bench", "Hi", options)))
        stamps: list[float] = []
        while True:
            msg = JSON.decode_server(await asyncio.wait_for(ws.recv(), 60))
            if isinstance(msg, m.Delta):
                stamps.append(time.perf_counter())
            elif isinstance(msg, m.Done):
                break
            elif isinstance(msg, m.Error):
                raise RuntimeError(f"generation failed: {msg.code.value}: {msg.message}")
        return [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    finally:
        await ws.close()


async def _open_many(url: str, token: str, n: int, batch: int) -> list[ClientConnection]:
    sessions: list[ClientConnection] = []
    sources = _sources(n)
    for start in range(0, n, batch):
        got = await asyncio.gather(
            *(
                _session(url, token, sources[(start + i) % len(sources)])
                for i in range(min(batch, n - start))
            ),
            return_exceptions=True,
        )
        failed = [g for g in got if isinstance(g, BaseException)]
        sessions.extend(g for g in got if isinstance(g, ClientConnection))
        if failed:
            await _close_all(sessions)
            raise RuntimeError(f"{len(failed)} sessions failed to open: {failed[0]!r}")
    return sessions


async def _close_all(sessions: list[ClientConnection]) -> None:
    for start in range(0, len(sessions), 1000):
        await asyncio.gather(
            *(ws.close() for ws in sessions[start : start + 1000]), return_exceptions=True
        )


async def _handshakes(url: str, token: str, n: int) -> list[float]:
    """Latencies (ms) of ``n`` new sessions, one after the other: connect to ready."""
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        ws = await _session(url, token)
        out.append((time.perf_counter() - t0) * 1000)
        await ws.close()
    return out


async def _probe(url: str, token: str, mode: str, count: int, timeout: float) -> list[float]:
    """:func:`_itl` or :func:`_handshakes` in a process of its own: the bench process,
    which holds thousands of connections (and their garbage collections), must not
    add its own delays to the latencies it reports."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.idle",
        "--probe",
        url,
        "--token",
        token,
        "--mode",
        mode,
        "--count",
        str(count),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} probe failed with {proc.returncode}")
    values = json.loads(out)
    assert isinstance(values, list)
    return [float(v) for v in values]


async def _itl_runs(url: str, token: str, args: argparse.Namespace) -> list[float]:
    """The latencies of ``--runs`` probes, pooled (one run's p99 is a handful of samples)."""
    out: list[float] = []
    for _ in range(args.runs):
        out += await _probe(url, token, "itl", args.tokens, 120)
    return out


def rss_target_mb(sessions: int) -> float:
    """The gateway's memory budget: the line through the targets, 400 MB at 10,000
    sessions and 1.2 GB at 50,000 (200 MB, plus 20 kB a session)."""
    return 200.0 + 0.02 * sessions


def _rss_mb(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / (1024 * 1024)


async def run(args: argparse.Namespace) -> dict[str, object]:
    _, fd_limit = raise_fd_limit()
    if fd_limit < args.sessions + 1000:
        raise SystemExit(
            f"the open-file limit ({fd_limit}) is too low for {args.sessions} sessions"
        )
    with tempfile.TemporaryDirectory(prefix="ferrous-idle-") as home:
        model = write_tiny_llama(
            Path(home) / "bench.gguf",
            script=SCRIPT,
            spec=TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096),
        )
        env = {
            **os.environ,
            "FERROUS_HOME": home,
            "FERROUS_LIMITS__MAX_SESSIONS": str(args.sessions + args.new + 100),
        }
        token = _mint_token(env)
        proc, port = start_server(model, home=home, auth=True, env=env, ready_path="/healthz")
        url = f"ws://127.0.0.1:{port}/v1/ws"
        server = psutil.Process(proc.pid)
        sessions: list[ClientConnection] = []
        try:
            async with asyncio.timeout(args.timeout):
                await _itl(url, token, 20)  # warm-up: model, code paths
                itl_idle = await _itl_runs(url, token, args)
                await asyncio.sleep(1.5)  # past the GC tuner's delay
                rss_before = _rss_mb(server)
                t0 = time.perf_counter()
                sessions = await _open_many(url, token, args.sessions, args.batch)
                open_s = time.perf_counter() - t0
                gc.freeze()  # the bench's own sessions: no collections walking them
                await asyncio.sleep(3.0)  # the post-burst GC freeze, heartbeats settle
                rss_after = _rss_mb(server)
                itl_loaded = await _itl_runs(url, token, args)
                live = asyncio.ensure_future(_probe(url, token, "itl", args.tokens, 120))
                await asyncio.sleep(0.5)  # the probe's session is streaming
                handshakes = await _probe(url, token, "handshakes", args.new, 120)
                itl_handshakes = await live
                rss_end = _rss_mb(server)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(60):
                    await _close_all(sessions)
            stop_server(proc)
    idle_p99 = _percentile(itl_idle, 99)
    loaded_p99 = _percentile(itl_loaded, 99)
    return {
        "sessions": len(sessions),
        "open_seconds": round(open_s, 2),
        "gateway_rss_mb_before": round(rss_before, 1),
        "gateway_rss_mb": round(rss_after, 1),
        "gateway_rss_mb_end": round(rss_end, 1),
        "rss_per_session_kb": round((rss_after - rss_before) * 1024 / max(1, len(sessions)), 2),
        "new_handshakes": len(handshakes),
        "handshake_p50_ms": round(_percentile(handshakes, 50), 2),
        "handshake_p99_ms": round(_percentile(handshakes, 99), 2),
        "itl_p50_ms_idle_server": round(_percentile(itl_idle, 50), 3),
        "itl_p99_ms_idle_server": round(idle_p99, 3),
        "itl_p50_ms_loaded": round(_percentile(itl_loaded, 50), 3),
        "itl_p99_ms_loaded": round(loaded_p99, 3),
        "itl_p99_ratio": round(loaded_p99 / idle_p99, 3) if idle_p99 else None,
        "itl_p99_ms_during_handshakes": round(_percentile(itl_handshakes, 99), 3),
        "sources": len(_sources(len(sessions))),
        "gateway_rss_target_mb": rss_target_mb(len(sessions)),
        "targets": {
            "gateway_rss_under_target": rss_after < rss_target_mb(len(sessions)),
            "handshake_p99_at_most_50_ms": _percentile(handshakes, 99) <= 50,
            "itl_p99_within_1_5x": loaded_p99 <= 1.5 * idle_p99,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=10000, help="idle sessions to hold open")
    p.add_argument("--new", type=int, default=200, help="new handshakes timed meanwhile")
    p.add_argument("--batch", type=int, default=250, help="sessions opened at once")
    p.add_argument("--tokens", type=int, default=200, help="tokens of each timed generation")
    p.add_argument("--runs", type=int, default=3, help="timed generations per condition")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # internal: see _itl_probe
    p.add_argument("--token", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("itl", "handshakes"), help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        probe = _itl if args.mode == "itl" else _handshakes
        print(json.dumps(uvloop.run(probe(args.probe, args.token, args.count))))
        return 0
    result = uvloop.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
