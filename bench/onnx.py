"""The ONNX backend against llama.cpp on the same weights, in one run.

    python -m bench.onnx [--tokens 96] [--runs 5] [--graph fast|f32] [--no-server]
                         [--tiny-only] [--server-tokens 128]
                         [--prefix-cache-mb N] [--llama-server PATH] [--json]

For two model pairs — SmolLM2-135M-Instruct (its Q4_1 GGUF, and that GGUF
converted by ``engine.onnx.convert``) and the project's tiny decoder (the
ONNX graph and its GGUF twin, same weights) — it reports:

* ``onnx_tok_s`` / ``llama_cpp_tok_s`` — single-stream decode rate through
  the engine (one worker process per model, ``--threads`` threads), tokens
  after the first over the time from the first to the last; rounds
  alternate which backend goes first; medians. ``ratio_vs_llama_cpp`` =
  onnx / llama.cpp, ``ratio_paired`` = median of per-round ratios.
* ``onnx_aggregate_tok_s`` / ``llama_cpp_aggregate_tok_s`` — all
  completion tokens / wall time with 1, 2, 4 and 8 concurrent generations
  on one worker (prompt reading included), and ``batch4_speedup`` =
  batch-4 aggregate / batch-1 aggregate.
* ``session_ceiling`` and ``matmul_nbits`` (SmolLM2, fast graph): the same
  graph's decode step timed on a bare onnxruntime session at 1/2/4/8 rows,
  and its 4-bit matmul kernel alone (see :mod:`bench.onnx_ceiling`): how
  far batching can go on this machine whatever the engine does.
* ``server`` (SmolLM2 only, unless ``--no-server``): ``ferrous serve`` with
  one worker holding 8 sequences, 8 WebSocket sessions chatting at once
  (128 tokens each), aggregate tokens/s for the ONNX model and for the GGUF
  through our llama.cpp backend, and llama.cpp's own server (``-np 8``, see
  :mod:`bench.llama_server`) on the same GGUF in the same run. Two
  workloads: ``same_prompt`` (every session sends the same 66-token chat
  prompt, the workload of the recorded reference) and ``distinct_prompts``
  (one system prompt, a different request per session). ``onnx_vs_llama_server``
  is the ONNX figure over llama-server's; without a llama-server binary here
  the same-prompt ratio is taken against ``LLAMA_SERVER_NP8``, a figure
  recorded on these machines, and named ``onnx_vs_recorded_llama_server``
  (``llama_server_measured: false``), never ``onnx_vs_llama_server``.

``--tiny-only`` runs the tiny pair alone (and the whole-server comparison on
it), a quick check that everything still runs. ``--graph fast`` (default) converts to the 4-bit fused graph
(``--q4 --fused``), ``f32`` to the exact float32 graph. ``--prefix-cache-mb``
sets the ONNX backend's store of finished sequences' keys and values (0:
none; prefixes are still shared between running sequences).
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

from bench import llama_server
from bench.engine import PROMPT
from bench.gateway import ws_stream
from bench.onnx_ceiling import LEVELS, ffn_shape, graph_ceiling, matmul_nbits_scaling
from bench.serving import start_server, stop_server
from engine import EngineClient, EngineConfig, GenerateRequest, GenerationDone, SamplingParams
from engine.backends.onnx_entry import OnnxOptions
from engine.client import default_threads
from engine.requests import TokenDelta

LLAMA_SERVER_NP8 = 157.5  # tok/s, llama-server -np 8, SmolLM2 Q4_1, 2 threads, these machines
# The whole-server run repeats the reference's workload: a chat prompt of 66 SmolLM2
# tokens, 128 tokens answered per session, 8 sessions at once.
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant who writes vivid, well organised and kind "
    "stories for readers of all ages.<|im_end|>\n<|im_start|>user\nWrite a detailed story "
    "about a lighthouse keeper who finds a message in a bottle on a stormy winter night far out at sea, and "
    "what she decides to do.<|im_end|>\n<|im_start|>assistant\n"
)
# The same system prompt, a different request per session.
HEROES = (
    "a lighthouse keeper",
    "a young baker",
    "an old fisherman",
    "a city gardener",
    "a night train driver",
    "a hospital nurse",
    "a mountain guide",
    "a village teacher",
)
DISTINCT_PROMPTS = [CHAT_PROMPT.replace("a lighthouse keeper", hero) for hero in HEROES]
SERVER_TOKENS = 128


async def single(engine: EngineClient, model: str, prompt: str, tokens: int) -> float:
    """Decode tokens/s of one greedy generation (first token to last)."""
    sampling = SamplingParams(
        temperature=0.0, repeat_penalty=1.0, max_tokens=tokens, ignore_eos=True
    )
    first = last = 0.0
    n = 0
    async for ev in engine.generate(GenerateRequest(model=model, prompt=prompt, sampling=sampling)):
        if isinstance(ev, TokenDelta):
            last = time.perf_counter()
            first = first or last
        elif isinstance(ev, GenerationDone):
            n = ev.usage.completion_tokens
    return (n - 1) / (last - first) if last > first else 0.0


async def aggregate(
    engine: EngineClient, model: str, prompt: str, streams: int, tokens: int
) -> tuple[float, float]:
    """(wall aggregate, steady-state decode aggregate) tokens/s of ``streams`` at once.

    The wall figure counts all tokens over the whole run, prompt reading
    included. The steady-state one counts the tokens produced while every
    stream was decoding (after the last first token, before the first last
    token): the batched decode rate itself.
    """
    sampling = SamplingParams(
        temperature=0.0, repeat_penalty=1.0, max_tokens=tokens, ignore_eos=True
    )
    stamps: list[list[float]] = [[] for _ in range(streams)]

    async def one(i: int) -> int:
        text = prompt.replace("lighthouse keeper", f"lighthouse keeper number {i}")
        request = GenerateRequest(model=model, prompt=text, sampling=sampling)
        async for ev in engine.generate(request):
            if isinstance(ev, TokenDelta):
                stamps[i].append(time.perf_counter())
            elif isinstance(ev, GenerationDone):
                return ev.usage.completion_tokens
        return 0

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = sum(counts) / (time.perf_counter() - t0)
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if start < t <= end)
    steady = inside / (end - start) if end > start else 0.0
    return wall, steady


async def compare(
    onnx_folder: Path, gguf: Path, prompt: str, args: argparse.Namespace
) -> dict[str, object]:
    config = EngineConfig(
        workers=1,
        threads_per_worker=args.threads,
        seqs_per_worker=max(LEVELS),
        keep_alive=-1,
        options={"onnx": OnnxOptions(spinning=args.spinning, prefix_cache_mb=args.prefix_cache_mb)},
    )
    out: dict[str, object] = {}
    async with EngineClient(config) as engine:
        await engine.load("onnx", str(onnx_folder))
        await engine.load("gguf", str(gguf))
        for name in ("onnx", "gguf"):  # warm-up
            await single(engine, name, prompt, 16)
        onnx_rates: list[float] = []
        llama_rates: list[float] = []
        for i in range(args.runs):
            order = ("onnx", "gguf") if i % 2 == 0 else ("gguf", "onnx")
            for name in order:
                rate = await single(engine, name, prompt, args.tokens)
                (onnx_rates if name == "onnx" else llama_rates).append(rate)
        out["onnx_tok_s"] = round(statistics.median(onnx_rates), 1)
        out["llama_cpp_tok_s"] = round(statistics.median(llama_rates), 1)
        out["ratio_vs_llama_cpp"] = round(
            statistics.median(onnx_rates) / statistics.median(llama_rates), 3
        )
        out["ratio_paired"] = round(
            statistics.median(o / q for o, q in zip(onnx_rates, llama_rates, strict=True)), 3
        )
        for name, label in (("onnx", "onnx"), ("gguf", "llama_cpp")):
            walls: dict[str, float] = {}
            steady: dict[str, float] = {}
            for n in LEVELS:
                pairs = [
                    await aggregate(engine, name, prompt, n, args.tokens)
                    for _ in range(max(1, args.runs // 2))
                ]
                walls[str(n)] = round(statistics.median(p[0] for p in pairs), 1)
                steady[str(n)] = round(statistics.median(p[1] for p in pairs), 1)
            out[f"{label}_aggregate_tok_s"] = walls
            out[f"{label}_decode_aggregate_tok_s"] = steady
    walls_onnx = out["onnx_aggregate_tok_s"]
    steady_onnx = out["onnx_decode_aggregate_tok_s"]
    assert isinstance(walls_onnx, dict) and isinstance(steady_onnx, dict)
    out["batch4_speedup"] = round(walls_onnx["4"] / walls_onnx["1"], 2)
    out["decode_batch4_speedup"] = round(steady_onnx["4"] / steady_onnx["1"], 2)
    return out


def server_rounds(args: argparse.Namespace) -> int:
    """Rounds of the whole-server runs: the first one reads the prompts cold, so at least 3
    (a smoke run with ``--runs 1`` takes one)."""
    return 1 if args.runs <= 1 else max(3, int(args.runs) // 2)


async def server_aggregate(model: Path, args: argparse.Namespace, prompts: list[str]) -> float:
    """Median over rounds of (completion tokens / wall time), one WebSocket session per prompt."""
    with tempfile.TemporaryDirectory() as home:
        env = {
            "FERROUS_ONNX__SPINNING": "true" if args.spinning else "false",
            "FERROUS_ONNX__PREFIX_CACHE_MB": str(args.prefix_cache_mb),
        }
        proc, port = start_server(
            model,
            home=home,
            threads=args.threads,
            seqs=len(prompts) if args.seqs is None else (args.seqs or None),
            env=env,
        )
        url = f"ws://127.0.0.1:{port}/v1/ws"
        try:
            await ws_stream(url, 16, prompt=prompts[0])  # warm-up (and the model load)
            rates = []
            for _ in range(server_rounds(args)):
                t0 = time.perf_counter()
                results = await asyncio.gather(
                    *(ws_stream(url, args.server_tokens, f"s{i}", p) for i, p in enumerate(prompts))
                )
                rates.append(sum(n for _, _, n in results) / (time.perf_counter() - t0))
            return round(statistics.median(rates), 1)
        finally:
            stop_server(proc)


async def servers(onnx: Path, gguf: Path, args: argparse.Namespace) -> dict[str, object]:
    """The whole-server comparison: ours (ONNX, llama.cpp backend) and llama-server, same run."""
    binary = llama_server.find_binary(args.llama_server)
    out: dict[str, object] = {
        "streams": len(DISTINCT_PROMPTS),
        "tokens_each": args.server_tokens,
        "llama_server_measured": binary is not None,
    }
    for label, prompts in (
        ("same_prompt", [CHAT_PROMPT] * len(DISTINCT_PROMPTS)),
        ("distinct_prompts", DISTINCT_PROMPTS),
    ):
        row: dict[str, float] = {
            "onnx_tok_s": await server_aggregate(onnx, args, prompts),
            "llama_cpp_backend_tok_s": await server_aggregate(gguf, args, prompts),
        }
        if binary is not None:
            row["llama_server_tok_s"] = await llama_server.aggregate(
                binary,
                gguf,
                prompts,
                args.server_tokens,
                threads=args.threads,
                rounds=server_rounds(args),
            )
        measured = row.get("llama_server_tok_s")
        if measured:
            row["onnx_vs_llama_server"] = round(row["onnx_tok_s"] / measured, 2)
        elif label == "same_prompt":
            # Not measured here: against the recorded figure, under its own name.
            row["onnx_vs_recorded_llama_server"] = round(row["onnx_tok_s"] / LLAMA_SERVER_NP8, 2)
        out[label] = row
    if binary is None:
        out["llama_server_np8_reference_tok_s"] = LLAMA_SERVER_NP8
    return out


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    from engine.onnx.convert import convert_gguf
    from engine.onnx.tinydecoder import write_tiny_decoder
    from engine.smollm2 import fetch_smollm2

    fast = args.graph == "fast"
    quantize = "q4" if fast else None
    result: dict[str, object] = {
        "graph": "4-bit MatMulNBits, fused ops, shared KV" if fast else "float32",
        "tokens": args.tokens,
        "runs": args.runs,
        "threads": args.threads,
        "spinning": args.spinning,
        "prefix_cache_mb": args.prefix_cache_mb,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = write_tiny_decoder(root / "tiny", quantize=quantize, fused=fast)
        result["tiny"] = await compare(tiny, tiny / "model.gguf", "The small town sat", args)
        if args.tiny_only:
            if not args.no_server:
                result["server"] = await servers(tiny, tiny / "model.gguf", args)
            return result
        gguf = fetch_smollm2()
        t0 = time.perf_counter()
        smol = convert_gguf(gguf, root / "smollm2-onnx", quantize=quantize, fused=fast)
        convert_s = round(time.perf_counter() - t0, 1)
        smol_result = await compare(smol, gguf, PROMPT, args)
        smol_result["convert_s"] = convert_s
        smol_result["onnx_mb"] = round(sum(p.stat().st_size for p in smol.iterdir()) / 2**20, 1)
        if fast:
            smol_result["session_ceiling"] = graph_ceiling(
                smol, threads=args.threads, spinning=args.spinning
            )
            hidden, ffn = ffn_shape(smol)
            smol_result["matmul_nbits"] = matmul_nbits_scaling(
                hidden, ffn, threads=args.threads, spinning=args.spinning
            )
        result["smollm2"] = smol_result
        if not args.no_server:
            result["server"] = await servers(smol, gguf, args)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.onnx", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--graph", choices=("fast", "f32"), default="fast")
    parser.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=OnnxOptions().spinning,
        help="onnxruntime intra-op spinning (default: the engine's)",
    )
    parser.add_argument("--no-server", action="store_true", help="skip the whole-server run")
    parser.add_argument(
        "--tiny-only",
        action="store_true",
        help="only the tiny model pair (the whole-server run on it too): a quick check",
    )
    parser.add_argument(
        "--server-tokens",
        type=int,
        default=SERVER_TOKENS,
        help="completion tokens per stream in the whole-server runs",
    )
    parser.add_argument(
        "--seqs",
        type=int,
        default=None,
        help="sequences per worker in the whole-server runs (default: one per session; "
        "0: the server's own default)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=OnnxOptions().prefix_cache_mb,
        help="the ONNX backend's store of finished sequences' keys and values (0: none)",
    )
    parser.add_argument(
        "--llama-server",
        default=None,
        help="llama-server binary to measure in the same run (see bench.llama_server)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(main_async(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
