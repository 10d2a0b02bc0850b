"""Aggregate decode throughput of one worker with 1, 2, 4 and 8 concurrent streams.

    python -m bench.concurrency [--model PATH] [--tokens 128] [--streams 1,2,4,8] [--json]
                                [--spinning | --no-spinning]

``--model`` is a GGUF file or an ONNX model folder (``--no-spinning`` turns
off onnxruntime's intra-op thread spinning for ONNX models, on by default).

Each stream greedily generates ``--tokens`` tokens of a chat prompt; the
figure per concurrency level is total tokens / wall time from the first
request to the last final event (prompt reading included), median of
``--runs`` rounds. Streams on one worker share one ``llama_decode`` per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import uvloop

from bench.engine import PROMPT
from engine import EngineClient, EngineConfig, GenerateRequest, GenerationDone, SamplingParams
from engine.backends.onnx_entry import OnnxOptions
from engine.client import default_threads


async def one_round(engine: EngineClient, streams: int, tokens: int) -> float:
    sampling = SamplingParams(
        temperature=0.0, repeat_penalty=1.0, max_tokens=tokens, ignore_eos=True
    )

    async def stream(i: int) -> int:
        prompt = PROMPT.replace("lighthouse keeper", f"lighthouse keeper number {i}")
        async for ev in engine.generate(
            GenerateRequest(model="m", prompt=prompt, sampling=sampling)
        ):
            if isinstance(ev, GenerationDone):
                return ev.usage.completion_tokens
        return 0

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(stream(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    model = args.model
    if model is None:
        from engine.smollm2 import fetch_smollm2

        model = str(fetch_smollm2())
    levels = [int(x) for x in args.streams.split(",")]
    config = EngineConfig(
        workers=1,
        threads_per_worker=args.threads,
        seqs_per_worker=max(levels),
        options={"onnx": OnnxOptions(spinning=args.spinning)},
    )
    result: dict[str, object] = {
        "model": model.rsplit("/", 1)[-1],
        "tokens": args.tokens,
        "threads": args.threads,
        "spinning": args.spinning,
    }
    async with EngineClient(config) as engine:
        await engine.load("m", model)
        await one_round(engine, 1, 16)  # warm-up
        for n in levels:
            rates = [await one_round(engine, n, args.tokens) for _ in range(args.runs)]
            result[f"aggregate_tok_s_{n}"] = round(statistics.median(rates), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.concurrency", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=OnnxOptions().spinning,
        help="ONNX: intra-op spinning within each run (default: the engine's)",
    )
    args = parser.parse_args()
    result = uvloop.run(main_async(args))
    print(
        json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items())
    )


if __name__ == "__main__":
    main()
