"""What constrained decoding costs, per backend, at 1 and 8 concurrent streams.

    python -m bench.grammar [--model GGUF] [--onnx FOLDER] [--tokens 96] [--runs 3]
                            [--streams 1,8] [--threads N] [--skip-onnx] [--json]

For SmolLM2 through the llama.cpp backend (GBNF grammars for JSON schemas,
llguidance for tool calls) and through the ONNX backend (the fast graph, the
same GGUF converted; llguidance for everything), decode tokens/s of:

* ``free`` — no constraint (end of generation ignored, ``--tokens`` each);
* ``json_schema`` — an object with one string of at least 400 characters,
  so the grammar is active for every one of the ``--tokens`` tokens;
* ``tools_auto`` — a chat with two tools and ``tool_choice: auto``: the
  lazily triggered tool grammar watching free text (what every tool-using
  chat pays while the model talks); compared with ``tools_prompt``, the same
  prompt (the tools described in the system message) without the grammar,
  since a longer prompt alone makes every decode step slower.

Each figure is the median over ``--runs`` rounds of the mean per-stream
``decode_tok_s`` (tokens after the first over the time after the first), at 1
and 8 streams on one worker; ``*_vs_free`` are the ratios to ``free`` at the
same concurrency (``tools_auto`` to ``tools_prompt``; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import uvloop

from engine import (
    ChatMessage,
    EngineClient,
    EngineConfig,
    GenerateRequest,
    GenerationDone,
    SamplingParams,
    ToolFunction,
)
from engine.client import default_threads
from engine.tools import generic_messages

LONG_TEXT = json.dumps(
    {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 400}},
        "required": ["story"],
    }
)
TOOLS = [
    ToolFunction(
        "get_weather",
        "Current weather of a city",
        json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
    ),
    ToolFunction(
        "get_time",
        "Local time of a city",
        json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
    ),
]
QUESTION = "Tell me a long story about a lighthouse keeper and the sea, number {i}."


def _request(kind: str, i: int, tokens: int) -> GenerateRequest:
    messages = [ChatMessage("user", QUESTION.format(i=i))]
    base = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": tokens}
    if kind == "free":
        return GenerateRequest(
            model="m", messages=messages, sampling=SamplingParams(**base, ignore_eos=True)
        )
    if kind == "tools_prompt":
        return GenerateRequest(
            model="m",
            messages=generic_messages(messages, TOOLS),
            sampling=SamplingParams(**base, ignore_eos=True),
        )
    if kind == "json_schema":
        return GenerateRequest(
            model="m", messages=messages, sampling=SamplingParams(**base, json_schema=LONG_TEXT)
        )
    return GenerateRequest(
        model="m",
        messages=messages,
        sampling=SamplingParams(**base, ignore_eos=True),
        tools=TOOLS,
        tool_choice="auto",
    )


async def _round(engine: EngineClient, kind: str, streams: int, tokens: int) -> float:
    async def one(i: int) -> float:
        async for ev in engine.generate(_request(kind, i, tokens)):
            if isinstance(ev, GenerationDone):
                if ev.error is not None:
                    raise RuntimeError(f"{kind}: {ev.error.message}")
                return ev.timings.decode_tok_s
        return 0.0

    rates = await asyncio.gather(*(one(i) for i in range(streams)))
    return statistics.mean(rates)


async def _backend(model: Path, backend: str, args: argparse.Namespace) -> dict[str, float]:
    config = EngineConfig(workers=1, threads_per_worker=args.threads, seqs_per_worker=8)
    out: dict[str, float] = {}
    async with EngineClient(config) as engine:
        await engine.load("m", model, backend=backend)
        await _round(engine, "json_schema", 1, 8)  # warm-up: grammar engines, caches
        await _round(engine, "tools_auto", 1, 8)
        for streams in args.streams:
            for kind in ("free", "json_schema", "tools_prompt", "tools_auto"):
                rounds = [
                    await _round(engine, kind, streams, args.tokens) for _ in range(args.runs)
                ]
                out[f"{kind}_{streams}"] = round(statistics.median(rounds), 1)
            out[f"json_schema_vs_free_{streams}"] = round(
                out[f"json_schema_{streams}"] / out[f"free_{streams}"], 3
            )
            out[f"tools_auto_vs_free_{streams}"] = round(
                out[f"tools_auto_{streams}"] / out[f"tools_prompt_{streams}"], 3
            )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    from engine.onnx.convert import convert_gguf
    from engine.smollm2 import fetch_smollm2

    gguf = Path(args.model) if args.model else fetch_smollm2()
    result: dict[str, object] = {"tokens": args.tokens, "runs": args.runs, "threads": args.threads}
    result["llama_cpp"] = await _backend(gguf, "llama_cpp", args)
    if args.onnx is not None:
        result["onnx"] = await _backend(Path(args.onnx), "onnx", args)
    elif not args.skip_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            folder = convert_gguf(gguf, Path(tmp) / "onnx", quantize="q4", fused=True)
            result["onnx"] = await _backend(folder, "onnx", args)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.grammar", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--streams",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 8],
        help="concurrencies to measure, comma-separated (default 1,8)",
    )
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--skip-onnx", action="store_true", help="the llama.cpp backend only")
    parser.add_argument(
        "--onnx", default=None, help="an ONNX folder of the same model (default: convert the GGUF)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(main_async(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
