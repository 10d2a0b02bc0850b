"""How fast a dropped session comes back: reconnect to the first replayed delta.

    python -m bench.resume [--model GGUF] [--trials 50] [--tokens 200] [--json]

Starts ``ferrous serve`` (one worker; a tiny script model whose decode steps
take a few milliseconds, or ``--model``), then ``--trials`` times:

1. opens a session, starts a generation of ``--tokens`` tokens, reads its
   first few deltas and aborts the TCP connection (no close frame), as a
   phone losing its network does; waits ``--gap`` seconds while the
   generation runs on into the session's replay buffer;
2. opens a new connection and resumes (``hello`` with the token and the last
   message number read) and times it up to the first replayed delta
   (``resume_ms``: TCP connect, WebSocket upgrade, hello, ready, the replay);
3. reads the rest and checks the text: every delta exactly once, in order.

The baseline, measured the same way in the same run, is opening a fresh
session up to its ``ready`` (``fresh_ms``): what a client that cannot resume
pays before it can even ask again. ``resume_over_fresh`` is the ratio of the
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import uvloop
from websockets.asyncio.client import ClientConnection, connect

from bench.idle import SCRIPT, _percentile
from bench.serving import start_server, stop_server
from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
from protocol import messages as m
from protocol.codec import codec_for

__all__ = ["main", "run"]

JSON = codec_for(m.SUBPROTOCOL_JSON)


async def _open(url: str, hello: m.Hello) -> tuple[ClientConnection, m.Ready]:
    ws = await connect(url, subprotocols=[m.SUBPROTOCOL_JSON])  # type: ignore[list-item]
    await ws.send(JSON.encode(hello))
    while True:
        msg = JSON.decode_server(await ws.recv())
        if isinstance(msg, m.Ready):
            return ws, msg


async def _trial(url: str, model: str, tokens: int, gap: float) -> dict[str, float]:
    t0 = time.perf_counter()
    ws, ready = await _open(url, m.Hello())
    fresh_ms = (time.perf_counter() - t0) * 1000
    if ready.resume_token is None:
        raise SystemExit("the server does not offer resume (resume_window is 0)")
    options = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=tokens)
    await ws.send(JSON.encode(m.Generate("g", model, "x", options)))
    deltas: list[m.Delta] = []
    last = 0
    while len(deltas) < 3:
        msg = JSON.decode_server(await ws.recv())
        last = getattr(msg, "n", None) or last
        if isinstance(msg, m.Delta):
            deltas.append(msg)
    ws.transport.abort()
    await asyncio.sleep(gap)
    t1 = time.perf_counter()
    ws, again = await _open(url, m.Hello(resume=ready.resume_token, last=last))
    if not again.resumed:
        raise RuntimeError("the session was not resumed")
    first = JSON.decode_server(await ws.recv())
    resume_ms = (time.perf_counter() - t1) * 1000
    replayed = 0
    msg = first
    while not isinstance(msg, m.Done):
        if isinstance(msg, m.Delta):
            deltas.append(msg)
            replayed += 1
        msg = JSON.decode_server(await ws.recv())
    await ws.close()
    if [d.seq for d in deltas] != list(range(len(deltas))):
        raise RuntimeError("a delta went missing or came twice")
    return {"fresh_ms": fresh_ms, "resume_ms": resume_ms, "replayed": replayed}


async def _run(url: str, model: str, trials: int, tokens: int, gap: float) -> dict[str, object]:
    rows = [await _trial(url, model, tokens, gap) for _ in range(trials)]
    resume = [r["resume_ms"] for r in rows]
    fresh = [r["fresh_ms"] for r in rows]
    result: dict[str, object] = {
        "trials": trials,
        "resume_p50_ms": round(statistics.median(resume), 2),
        "resume_p99_ms": round(_percentile(resume, 99), 2),
        "fresh_p50_ms": round(statistics.median(fresh), 2),
        "fresh_p99_ms": round(_percentile(fresh, 99), 2),
        "replayed_deltas_p50": statistics.median(r["replayed"] for r in rows),
    }
    result["resume_over_fresh"] = round(statistics.median(resume) / statistics.median(fresh), 3)
    return result


def run(
    model: Path | None, trials: int, tokens: int, gap: float, threads: int = 1
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ferrous-bench-resume-") as home:
        if model is None:
            model = Path(home) / "slow.gguf"
            spec = TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096)
            write_tiny_llama(model, script=SCRIPT, spec=spec)
        proc, port = start_server(model, home=home, threads=threads)
        try:
            url = f"ws://127.0.0.1:{port}/v1/ws"
            return uvloop.run(_run(url, "bench", trials, tokens, gap))
        finally:
            stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a GGUF (default: a tiny script model)")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--gap", type=float, default=0.05, help="seconds offline before reconnecting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.model, args.trials, args.tokens, args.gap, args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
