"""Clients that never read: what they cost `ferrous serve`, and what they do to a live stream.

    python -m bench.slowclients [--clients 200] [--tokens 200] [--runs 3] [--json]

Starts ``ferrous serve`` like :mod:`bench.idle` (auth on, one worker, a small
script model), then:

1. streams ``--tokens`` tokens ``--runs`` times on the unloaded server (in a
   probe process) and pools the inter-token latencies (``itl_p99_ms_baseline``);
2. opens ``--clients`` authenticated sessions over raw sockets with a 4 KiB
   receive buffer that never read a byte: each asks for one generation of
   ``--their-tokens`` tokens, then sends a heartbeat (which asks for a reply)
   every second; their answers back up in the kernel and in the server;
3. once their generations have ended, measures the same ITL with them still
   connected and heartbeating (``itl_p99_ms_loaded``; target: within 1.5x of
   the baseline), and the gateway's RSS growth per never-reading connection
   (``rss_per_client_kb``).

``--flood`` makes them hostile instead: each sends heartbeats as fast as the
kernel takes them (200 per send, every 0.2 s), so the server works through
their queued requests until its replies to each back up (uvicorn pauses a
connection at 64 KiB of unsent data, and the session then stops reading it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import uvloop

from bench.idle import SCRIPT, _itl_runs, _mint_token, _percentile, _probe, _rss_mb
from bench.serving import start_server, stop_server
from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
from protocol import messages as m
from protocol.codec import codec_for

__all__ = ["main", "run"]

JSON = codec_for(m.SUBPROTOCOL_JSON)


def _frame(payload: bytes) -> bytes:
    """A masked client text frame (the zero mask key is allowed, RFC 6455 5.3)."""
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def _session(port: int, token: str) -> socket.socket:
    """Upgrade and say hello over a raw socket with a tiny receive buffer; returns it non-blocking."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {m.SUBPROTOCOL_JSON}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the server closed the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    sock.sendall(_frame(JSON.encode(m.Hello(client="bench.slowclients")).encode()))
    sock.setblocking(False)
    return sock


def _flood(sock: socket.socket, data: bytes) -> int:
    """Send as much of ``data`` as the kernel takes now (the client never reads)."""
    with contextlib.suppress(BlockingIOError, InterruptedError):
        return sock.send(data)
    return 0


async def _drained(port: int, timeout: float = 120.0) -> None:
    """Wait until no generation is in flight (the never-readers' have ended)."""
    import urllib.request

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        line = next(x for x in text.splitlines() if x.startswith("ferrous_active_generations "))
        if float(line.split()[1]) == 0:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the never-readers' generations did not end")


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ferrous-slow-") as home:
        model = write_tiny_llama(
            Path(home) / "bench.gguf",
            script=SCRIPT,
            spec=TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096),
        )
        env = {**os.environ, "FERROUS_HOME": home}
        token = _mint_token(env)
        proc, port = start_server(model, home=home, auth=True, env=env, ready_path="/healthz")
        url = f"ws://127.0.0.1:{port}/v1/ws"
        server = psutil.Process(proc.pid)
        socks: list[socket.socket] = []
        flood = _frame(JSON.encode(m.Heartbeat()).encode()) * 200
        try:
            async with asyncio.timeout(args.timeout):
                await _probe(url, token, "itl", 20, 120)  # warm-up
                baseline = await _itl_runs(url, token, args)
                await asyncio.sleep(1.5)
                rss_before = _rss_mb(server)
                socks = list(
                    await asyncio.gather(
                        *(asyncio.to_thread(_session, port, token) for _ in range(args.clients))
                    )
                )
                ask = _frame(
                    JSON.encode(
                        m.Generate("g", "bench", "Hi", m.Options(max_tokens=args.their_tokens))
                    ).encode()
                )
                sent = sum(_flood(s, flood if args.flood else ask) for s in socks)
                beat = _frame(JSON.encode(m.Heartbeat()).encode())

                async def keep_flooding() -> None:
                    nonlocal sent
                    while True:
                        await asyncio.sleep(0.2 if args.flood else 1.0)
                        sent += sum(_flood(s, flood if args.flood else beat) for s in socks)

                flooder = asyncio.ensure_future(keep_flooding())
                try:
                    if not args.flood:
                        await _drained(port)
                    await asyncio.sleep(2.0)
                    rss_after = _rss_mb(server)
                    loaded = await _itl_runs(url, token, args)
                    rss_end = _rss_mb(server)
                finally:
                    flooder.cancel()
        finally:
            for s in socks:
                s.close()
            stop_server(proc)
    base_p99 = _percentile(baseline, 99)
    loaded_p99 = _percentile(loaded, 99)
    per_client = (max(rss_after, rss_end) - rss_before) * 1024 / max(1, len(socks))
    return {
        "clients": len(socks),
        "mode": "flood"
        if args.flood
        else f"one {args.their_tokens}-token generation each, then a heartbeat per second",
        "bytes_flooded": sent,
        "gateway_rss_mb_before": round(rss_before, 1),
        "gateway_rss_mb_loaded": round(max(rss_after, rss_end), 1),
        "rss_per_client_kb": round(per_client, 1),
        "itl_p50_ms_baseline": round(_percentile(baseline, 50), 3),
        "itl_p99_ms_baseline": round(base_p99, 3),
        "itl_p50_ms_loaded": round(_percentile(loaded, 50), 3),
        "itl_p99_ms_loaded": round(loaded_p99, 3),
        "itl_p99_ratio": round(loaded_p99 / base_p99, 3) if base_p99 else None,
        "targets": {
            "itl_p99_within_1_5x": loaded_p99 <= 1.5 * base_p99,
            "rss_per_client_under_256_kb": per_client < 256,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.slowclients", description=__doc__.split("\n")[0]
    )
    p.add_argument("--clients", type=int, default=200, help="sessions that never read")
    p.add_argument("--tokens", type=int, default=200, help="tokens of each timed generation")
    p.add_argument("--runs", type=int, default=3, help="timed generations per condition")
    p.add_argument("--their-tokens", type=int, default=64, help="each never-reader's generation")
    p.add_argument("--flood", action="store_true", help="never-readers flood heartbeats instead")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = uvloop.run(run(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if all(result["targets"].values()) else 1  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main())
