"""llama.cpp's own server as a same-run reference for the whole-server benchmarks.

    python -m bench.llama_server build [--dir DIR]    # compile llama-server, print its path
    python -m bench.llama_server run [--binary PATH] [--streams 8] [--tokens 128] [--json]

``llama-server`` is not part of any Python package, but its sources are: the
llama-cpp-python source distribution (the version installed here, fetched
from the package index) vendors llama.cpp with ``tools/server``. ``build``
compiles just that target with the same flags the project installs
llama-cpp-python with (``GGML_NATIVE=OFF``: AVX2 and friends, no
``-march=native``); it takes ~15 minutes on 2 cores.

``run`` (and :func:`aggregate`, used by ``bench.onnx``) starts it with ``-np
N`` slots (continuous batching, its defaults otherwise — flash attention
chosen automatically, each slot's prompt cache on) and streams N completions
of the same raw chat prompt at once over its ``/completion`` SSE endpoint,
greedy, end of generation ignored: the workload ``bench.onnx`` gives ``ferrous
serve``. The figure is all completion tokens / wall time.

The binary is found by ``--binary``, else ``$LLAMA_SERVER``, else
``llama-server`` on ``PATH``, else the one ``build`` left in its default
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import httpx
import uvloop

from bench.serving import free_port, stop_server
from engine.client import default_threads

__all__ = ["BUILD_DIR", "aggregate", "build", "find_binary"]

BUILD_DIR = Path.home() / ".ferrous" / "llama-server"


def find_binary(explicit: str | None = None) -> Path | None:
    """The llama-server to measure, or None when there is none here."""
    for candidate in (explicit, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    built = BUILD_DIR / "bin" / "llama-server"
    return built if built.is_file() else None


def build(root: Path = BUILD_DIR) -> Path:
    """Compile llama-server from the installed llama-cpp-python's source distribution."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"building llama-server needs {tool} on PATH")
    version = metadata.version("llama_cpp_python")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (source,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
        work = Path(tmp) / "build"
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_CURL=OFF",
        ]
        subprocess.run(["cmake", "-S", str(source), "-B", str(work), *flags], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(
            ["cmake", "--build", str(work), "--target", "llama-server", "-j", jobs], check=True
        )
        (root / "bin").mkdir(parents=True, exist_ok=True)
        target = root / "bin" / "llama-server"
        shutil.copy2(work / "bin" / "llama-server", target)
    return target


async def _completion(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> int:
    """Completion tokens of one streamed greedy completion."""
    body = {
        "prompt": prompt,
        "n_predict": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "stream": True,
    }
    async with client.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("stop"):
                return int(event.get("tokens_predicted", 0))
    raise RuntimeError("llama-server ended a stream without its final event")


async def aggregate(
    binary: Path,
    gguf: Path,
    prompts: list[str],
    tokens: int,
    *,
    threads: int,
    rounds: int,
) -> float:
    """Median over ``rounds`` of (completion tokens / wall time) for ``prompts`` streamed at once."""
    port = free_port()
    ctx = len(prompts) * 512  # each slot gets n_ctx / slots
    proc = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(gguf),
            "-np",
            str(len(prompts)),
            "-c",
            str(ctx),
            "-t",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("llama-server did not start")
                await asyncio.sleep(0.2)
            await _completion(client, f"{base}/completion", prompts[0], 16)  # warm-up
            rates = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                counts = await asyncio.gather(
                    *(_completion(client, f"{base}/completion", p, tokens) for p in prompts)
                )
                rates.append(sum(counts) / (time.perf_counter() - t0))
            return round(statistics.median(rates), 1)
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.llama_server", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile llama-server from llama-cpp-python's sources")
    b.add_argument("--dir", type=Path, default=BUILD_DIR)
    r = sub.add_parser("run", help="measure llama-server with N streams at once")
    r.add_argument("--binary", default=None)
    r.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2)")
    r.add_argument("--streams", type=int, default=8)
    r.add_argument("--tokens", type=int, default=128)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--threads", type=int, default=default_threads())
    r.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "build":
        print(build(args.dir))
        return
    from bench.onnx import CHAT_PROMPT
    from engine.smollm2 import fetch_smollm2

    binary = find_binary(args.binary)
    if binary is None:
        raise SystemExit("no llama-server found: python -m bench.llama_server build")
    gguf = Path(args.model) if args.model else fetch_smollm2()
    rate = uvloop.run(
        aggregate(
            binary,
            gguf,
            [CHAT_PROMPT] * args.streams,
            args.tokens,
            threads=args.threads,
            rounds=args.rounds,
        )
    )
    result = {"streams": args.streams, "tokens_each": args.tokens, "aggregate_tok_s": rate}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
