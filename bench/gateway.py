"""End-to-end streaming: a WebSocket client against `ferrous serve` versus direct llama-cpp-python.

    python -m bench.gateway [--model PATH] [--tokens 256] [--runs 5] [--streams 1] [--json]

The server runs as its own process (``ferrous serve`` on a loopback port, one
worker with ``--threads`` threads); the client speaks protocol v1 over the
``websockets`` package. Greedy decoding of a fixed prompt, end-of-generation
ignored, after one warm-up of each path; rounds alternate which path goes
first; medians are reported:

* ``direct_tok_s`` / ``ws_tok_s`` — decode rate seen by the consumer,
  (tokens - 1) / (last delta - first delta);
* ``ttft_direct_ms`` / ``ttft_ws_ms`` — request sent to first token received;
* ``ratio`` — ws / direct; ``ratio_paired`` — median of per-round ratios.

With ``--streams N`` (N > 1) it also opens N sessions that generate at once
and reports ``aggregate_tok_s`` (all completion tokens / wall time).
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
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from bench.engine import PROMPT, run_direct
from bench.serving import start_server, stop_server
from engine.client import default_threads
from protocol import messages as m
from protocol.codec import codec_for

JSON = codec_for(m.SUBPROTOCOL_JSON)


async def ws_stream(
    url: str, tokens: int, gen_id: str = "g", prompt: str = PROMPT
) -> tuple[float, float, int]:
    """(decode tok/s, ttft ms, completion tokens) of one generation on a fresh session."""
    options = m.Options(
        temperature=0.0, top_p=1.0, repeat_penalty=1.0, max_tokens=tokens, ignore_eos=True
    )
    async with connect(url, subprotocols=[Subprotocol(m.SUBPROTOCOL_JSON)], max_size=None) as ws:
        await ws.send(JSON.encode(m.Hello(client="bench")))
        await ws.recv()
        t0 = time.perf_counter()
        await ws.send(JSON.encode(m.Generate(gen_id, "bench", prompt, options)))
        first = last = 0.0
        while True:
            msg = JSON.decode_server(await ws.recv())
            if isinstance(msg, m.Delta):
                last = time.perf_counter()
                first = first or last
            elif isinstance(msg, m.Done):
                n = msg.usage.completion_tokens
                return (n - 1) / (last - first) if last > first else 0.0, (first - t0) * 1000, n
            elif isinstance(msg, m.Error):
                raise SystemExit(f"server error: {msg.code.value}: {msg.message}")


async def aggregate(url: str, tokens: int, streams: int) -> float:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(ws_stream(url, tokens, f"s{i}") for i in range(streams)))
    return sum(n for _, _, n in results) / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    import llama_cpp

    model = args.model
    if model is None:
        from engine.smollm2 import fetch_smollm2

        model = str(fetch_smollm2())
    with tempfile.TemporaryDirectory() as home:
        proc, port = start_server(model, home=home, threads=args.threads, seqs=max(args.streams, 4))
        url = f"ws://127.0.0.1:{port}/v1/ws"
        try:
            llm = llama_cpp.Llama(
                model_path=model,
                n_ctx=4096,
                n_batch=512,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                verbose=False,
            )
            toks = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
            run_direct(llm, toks, args.tokens)
            await ws_stream(url, args.tokens)
            direct: list[tuple[float, float]] = []
            ws: list[tuple[float, float]] = []
            for i in range(args.runs):
                if i % 2 == 0:
                    direct.append(run_direct(llm, toks, args.tokens))
                    ws.append((await ws_stream(url, args.tokens))[:2])
                else:
                    ws.append((await ws_stream(url, args.tokens))[:2])
                    direct.append(run_direct(llm, toks, args.tokens))
            llm.close()
            result: dict[str, object] = {
                "model": Path(model).name,
                "tokens": args.tokens,
                "runs": args.runs,
                "threads": args.threads,
                "direct_tok_s": round(statistics.median(d[0] for d in direct), 2),
                "ws_tok_s": round(statistics.median(w[0] for w in ws), 2),
                "ttft_direct_ms": round(statistics.median(d[1] for d in direct), 2),
                "ttft_ws_ms": round(statistics.median(w[1] for w in ws), 2),
                "ratio_paired": round(
                    statistics.median(w[0] / d[0] for w, d in zip(ws, direct, strict=True)), 4
                ),
            }
            result["ratio"] = round(float(result["ws_tok_s"]) / float(result["direct_tok_s"]), 4)  # type: ignore[arg-type]
            if args.streams > 1:
                rates = [
                    await aggregate(url, args.tokens, args.streams)
                    for _ in range(max(1, args.runs // 2))
                ]
                result["streams"] = args.streams
                result["aggregate_tok_s"] = round(statistics.median(rates), 2)
            return result
        finally:
            stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(main_async(args))
    print(
        json.dumps(result) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in result.items())
    )


if __name__ == "__main__":
    main()
