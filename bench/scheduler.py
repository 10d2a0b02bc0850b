"""Many concurrent chats through ``ferrous serve`` and ``llama-server``, side by side in one run.

    python -m bench.scheduler [--model GGUF] [--streams 1,8,16,32] [--tokens 128] [--rounds 3]
                              [--json | --markdown] [--from-json RUN.json]
                              [--skip-reference] [--scenarios streams,turns,reading,users,fairness,priority]

Both servers get the same GGUF (SmolLM2 by default), threads, prompts and
token budget, through the same OpenAI route (``/v1/chat/completions``,
streamed): ``ferrous serve`` with its defaults, ``llama-server -np 8`` (built
by ``python -m bench.llama_server build``). Every figure is measured by the
client, from the request to each streamed chunk.

Scenarios:

* **streams** — N chats at once, each a question no server has seen (a new
  reference number opens it), ``--tokens`` greedy tokens each (end of answer
  ignored), ``--rounds`` times: aggregate tokens/s (all tokens / wall time from the
  first request to the last event; the median round), time to first token
  (median, p95) and inter-token latency (p50, p99 over every gap of every
  stream of every round). Beside each, ``decode_ceiling_tok_s``: llama.cpp
  alone (``bench.readcost.decode_tok_s``) decoding as many rows at once as
  that server runs (its slots, at most N), and ``of_ceiling``, the server's
  aggregate over it. No server streams faster than the steps it is made of,
  so where both servers are near 1.0 of their ceilings, their ratio is the
  machine's noise, not a difference between them. And ``burst_ceiling_tok_s``
  (up to 16 streams): llama.cpp alone getting the round's whole burst out
  (``bench.readcost.burst_tok_s``): each stream's new prompt tokens, as the
  server that read the fewest reported them, read in one step, then every
  token decoded with all streams in each step, nothing sampled or sent.
  ``of_burst_ceiling`` is a server's aggregate over it; a ratio between the
  servers above the ceiling over the other's aggregate is out of any
  server's reach on these kernels. ``ttft_p50_floor_ms``, from the same
  prompts: the soonest the burst's median first token can come, llama.cpp
  alone reading the fewest prompts it needs in one step
  (``bench.readcost.median_first_token_ms``; ``--no-ceiling`` skips them all).
* **turns** — one 10-turn conversation (each turn sends the history so far):
  time to first token per turn; the figure is turn 10 / turn 1.
* **reading** — the same conversation with a person's pause (1 s: reading
  the answer, typing the next question) before each follow-up, as chats
  through a front-end go: a server may use that pause (``ferrous serve``
  reads the template's turn marker then, engine.readahead).
* **users** — four users chat at once, each in a chat of their own (the same
  system prompt), taking turns one after another for four turns: time to
  first token of the later turns (median, p95). Keeping every recent chat's
  cache, not only the latest one's, is what makes these fast.
* **fairness** — tenant A keeps 32 long requests in flight (a new one as each
  ends) while tenant B asks a short question every second: B's time to first
  token p95 against B's p95 alone. On ``ferrous serve`` A and B hold API keys
  of different tenants; ``llama-server`` has no tenants and serves in order.
  Each of B's questions opens with a new reference number, so that no server
  answers it from a cache: B's first token costs reading B's question.
* **priority** — the same flood from A (one tenant) while a client sends
  requests with ``priority`` 10 (an API key allowed priority 10): their time
  to first token under the flood against unloaded.

The table's ratio column is ferrous / llama-server (for times lower is
better). Both servers are up at once but only one is asked at a time: stream
rounds alternate between them (and which goes first), so that a machine
whose speed drifts during the run weighs on both alike, and each round
starts with one unmeasured one-token request to its server, whose code and
data the other has just pushed out of the CPU caches; the other scenarios
run on one, then the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import uvloop

from bench.chatload import (
    FOLLOW_UPS,
    WARM,
    StreamResult,
    Target,
    chat,
    fresh_question,
    pct,
    question,
)
from bench.readcost import burst_tok_s, decode_tok_s, median_first_token_ms, read_ms
from bench.serving import free_port, start_server, stop_server
from engine.client import default_threads
from engine.settings import SEQS_PER_THREAD


class _Pooled:
    """Rates and latencies of one target over several rounds of one stream count."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.ttfts: list[float] = []
        self.gaps: list[float] = []

    def add(self, results: list[StreamResult], wall: float) -> None:
        self.rates.append(sum(x.tokens for x in results) / wall)
        self.ttfts += [x.ttft * 1000 for x in results]
        self.gaps += [g * 1000 for x in results for g in x.gaps]

    def summary(self) -> dict[str, float]:
        return {
            "aggregate_tok_s": round(statistics.median(self.rates), 1),
            "ttft_p50_ms": round(statistics.median(self.ttfts), 1),
            "ttft_p95_ms": round(pct(self.ttfts, 0.95), 1),
            "itl_p50_ms": round(pct(self.gaps, 0.5), 1),
            "itl_p99_ms": round(pct(self.gaps, 0.99), 1),
        }


async def streams_scenario(
    client: httpx.AsyncClient,
    targets: list[Target],
    n: int,
    tokens: int,
    rounds: int,
    ceiling: Callable[[int], float] | None = None,
    burst: Callable[[list[tuple[int, int]]], float] | None = None,
    first: Callable[[list[tuple[int, int]]], float] | None = None,
) -> list[dict[str, float]]:
    """``rounds`` bursts of ``n`` chats on each target, alternating targets round by round
    (and which goes first), so that a machine's drift hits both alike.

    With ``ceiling`` (tokens/s llama.cpp alone decodes with that many rows in a
    step), each round also measures it for each target's rows, between the
    bursts, so the ceiling drifts with the machine as the bursts do; the
    median is reported beside each target's figures. With ``burst`` (tokens/s
    llama.cpp alone gets out of the whole burst, prompts read, from each
    stream's ``(cached, read)`` prompt tokens), the same for the round's burst:
    each stream's prompt as the target that read the least of it reported it;
    with ``first`` too, the floor of the burst's median first token
    (``bench.readcost.median_first_token_ms``) from the same prompts."""
    pooled = [_Pooled() for _ in targets]
    ceilings: list[list[float]] = [[] for _ in targets]
    bursts: list[float] = []
    floors: list[float] = []
    for r in range(rounds):
        # Every stream a question no server has seen (the list of questions is
        # shorter than 3 rounds of 32, and the warm-up asks two of them): what is
        # measured is reading a prompt, not finding it cached.
        questions = [fresh_question(i + r * n) for i in range(n)]
        order = list(range(len(targets)))
        reported: dict[int, list[tuple[int, int]]] = {}
        if r % 2:
            order.reverse()
        for k in order:
            # One unmeasured request first: the other server (or the ceiling's
            # llama.cpp) has just run on the same cores and pushed this one's code
            # and data out of the CPU caches, which cost the first request after
            # it ~20 ms (ferrous serve) - a cost no server in service pays.
            await chat(client, targets[k], WARM, 1)
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(chat(client, targets[k], q, tokens) for q in questions)
            )
            pooled[k].add(list(results), time.perf_counter() - t0)
            reported[k] = [(x.cached_tokens, x.prompt_tokens - x.cached_tokens) for x in results]
        if burst is not None:
            least = _least_read(list(reported.values()))
            if least:
                bursts.append(await asyncio.to_thread(burst, least))
                if first is not None:
                    floors.append(await asyncio.to_thread(first, least))
        if ceiling is not None:
            found: dict[int, float] = {}
            for k, target in enumerate(targets):
                rows = min(n, target.slots)
                if rows not in found:
                    found[rows] = await asyncio.to_thread(ceiling, rows)
                ceilings[k].append(found[rows])
    out = [p.summary() for p in pooled]
    for summary, measured in zip(out, ceilings, strict=True):
        if measured:
            top = statistics.median(measured)
            summary["decode_ceiling_tok_s"] = round(top, 1)
            summary["of_ceiling"] = round(summary["aggregate_tok_s"] / top, 2)
        if bursts:
            top = statistics.median(bursts)
            summary["burst_ceiling_tok_s"] = round(top, 1)
            summary["of_burst_ceiling"] = round(summary["aggregate_tok_s"] / top, 2)
        if floors:
            summary["ttft_p50_floor_ms"] = round(statistics.median(floors), 1)
    return out


def _least_read(reported: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Each stream's ``(cached, read)`` prompt tokens as the target that read the
    fewest of them reported it (targets that report no prompt left out); empty
    when none reported them."""
    usable = [r for r in reported if r and all(cached + read > 0 for cached, read in r)]
    if not usable:
        return []
    return [min(each, key=lambda x: (x[1], -x[0])) for each in zip(*usable, strict=True)]


READ_PAUSE_S = 1.0  # a person reading an answer and typing the next question
READING_OPENING = "Tell me about the sun."  # the reading scenario's chat, not the turns one


async def turns_scenario(
    client: httpx.AsyncClient,
    target: Target,
    gguf: Path | None = None,
    threads: int = 2,
    pause: float = 0.0,
) -> dict[str, object]:
    history: list[dict[str, str]] = []
    ttfts: list[float] = []
    reads: list[tuple[int, int]] = []  # (cached, read) prompt tokens per turn, if reported
    for follow_up in FOLLOW_UPS:
        if history and pause:
            await asyncio.sleep(pause)
        elif pause:
            # Not the turns scenario's chat again (its caches would answer it), and
            # as many tokens to read at turn 1 as that chat's.
            follow_up = READING_OPENING
        history.append({"role": "user", "content": follow_up})
        r = await chat(client, target, history, 48, ignore_eos=False)
        ttfts.append(round(r.ttft * 1000, 1))
        reads.append((r.cached_tokens, r.prompt_tokens - r.cached_tokens))
        history.append({"role": "assistant", "content": r.text})
    out: dict[str, object] = {
        "ttft_ms": ttfts,
        "turn1_ttft_ms": ttfts[0],
        "turn10_ttft_ms": ttfts[-1],
        "turn10_over_turn1": round(ttfts[-1] / max(ttfts[0], 1e-3), 2),
    }
    if gguf is not None and reads[0][0] and reads[-1][0]:
        # The ceiling: llama.cpp alone reading turn 10's new tokens after its
        # history, against turn 1's after its cached prefix (bench.readcost).
        first, last = await asyncio.to_thread(read_ms, gguf, [reads[0], reads[-1]], threads=threads)
        out["prompt_read"] = [reads[0], reads[-1]]
        out["llama_cpp_turn10_over_turn1"] = round(last / first, 2)
    return out


async def reading_scenario(client: httpx.AsyncClient, target: Target) -> dict[str, object]:
    """The turns scenario's chat with a person's pause before each follow-up."""
    return await turns_scenario(client, target, pause=READ_PAUSE_S)


async def users_scenario(
    client: httpx.AsyncClient, target: Target, users: int = 4, turns: int = 4
) -> dict[str, object]:
    """``users`` people chat at once, each in a chat of their own opening with the same
    system prompt, taking turns one after another: the first token of their later turns.

    A server that keeps only the latest chat's cache reads each user's whole
    conversation again at every turn; one that keeps every chat's reads only
    the new question."""
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
    chats = [[system, *fresh_question(i)] for i in range(users)]
    ttfts: list[float] = []
    reread: list[int] = []  # prompt tokens read (not cached) in the later turns
    for turn in range(turns):
        for chat_messages in chats:
            r = await chat(client, target, chat_messages, 64)
            chat_messages += [
                {"role": "assistant", "content": r.text},
                {"role": "user", "content": FOLLOW_UPS[turn + 1]},
            ]
            if turn:
                ttfts.append(r.ttft * 1000)
                reread.append(r.prompt_tokens - r.cached_tokens)
    out: dict[str, object] = {
        "later_ttft_p50_ms": round(statistics.median(ttfts), 1),
        "later_ttft_p95_ms": round(pct(ttfts, 0.95), 1),
    }
    if any(reread):
        out["later_prompt_read_p50"] = statistics.median(reread)
    return out


@contextlib.asynccontextmanager
async def flood(
    client: httpx.AsyncClient, target: Target, who: str, in_flight: int, tokens: int
) -> AsyncIterator[None]:
    """Keep ``in_flight`` long requests of ``who`` running until the block ends."""
    stop = asyncio.Event()

    async def keep(i: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, RuntimeError):
                await chat(client, target, question(i), tokens, who=who)

    tasks = [asyncio.create_task(keep(i)) for i in range(in_flight)]
    await asyncio.sleep(3.0)  # let the flood fill every slot and the queue
    try:
        yield
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closed streams end their generations at the server's next step; let it
        # settle so the next measurement starts on an idle machine.
        await asyncio.sleep(5.0)


async def _paced(
    n: int, every: float, ask: Callable[[int], Awaitable[StreamResult]]
) -> list[float]:
    async def one(i: int) -> float:
        await asyncio.sleep(i * every)
        return (await ask(i)).ttft * 1000

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def fairness_scenario(
    client: httpx.AsyncClient, target: Target, *, asks: int = 12
) -> dict[str, float]:
    def ask(i: int) -> Awaitable[StreamResult]:
        return chat(client, target, fresh_question(i + 7), 8, who="b", ignore_eos=False)

    alone = await _paced(asks, 1.0, ask)
    async with flood(client, target, "a", 32, 256):
        loaded = await _paced(asks, 1.0, ask)
    return {
        "b_alone_ttft_p50_ms": round(statistics.median(alone), 1),
        "b_flood_ttft_p50_ms": round(statistics.median(loaded), 1),
        "b_alone_ttft_p95_ms": round(pct(alone, 0.95), 1),
        "b_flood_ttft_p95_ms": round(pct(loaded, 0.95), 1),
        "ratio": round(pct(loaded, 0.95) / max(pct(alone, 0.95), 1e-3), 2),
    }


async def priority_scenario(
    client: httpx.AsyncClient, target: Target, *, asks: int = 8
) -> dict[str, float]:
    def ask(i: int) -> Awaitable[StreamResult]:
        return chat(
            client, target, fresh_question(i + 3), 8, who="vip", priority=10, ignore_eos=False
        )

    alone = await _paced(asks, 1.0, ask)
    async with flood(client, target, "a", 32, 256):
        loaded = await _paced(asks, 1.0, ask)
    return {
        "high_alone_ttft_p50_ms": round(statistics.median(alone), 1),
        "high_flood_ttft_p50_ms": round(statistics.median(loaded), 1),
        "high_flood_ttft_p95_ms": round(pct(loaded, 0.95), 1),
        "ratio": round(statistics.median(loaded) / max(statistics.median(alone), 1e-3), 2),
    }


def _ceiling(gguf: Path, threads: int, rows: int) -> float:
    return decode_tok_s(gguf, rows, threads=threads)


BURST_MAX = 16  # the burst ceiling's streams at most: the sequences of its context


def _burst(gguf: Path, threads: int, tokens: int, reads: list[tuple[int, int]]) -> float:
    return burst_tok_s(gguf, reads, tokens, threads=threads, n_seq=BURST_MAX)


def _first(gguf: Path, threads: int, reads: list[tuple[int, int]]) -> float:
    return median_first_token_ms(gguf, reads, threads=threads, n_seq=BURST_MAX)


async def measure(targets: list[Target], args: argparse.Namespace) -> list[dict[str, object]]:
    """Every scenario on every target; stream rounds alternate between targets."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    out: list[dict[str, object]] = [{} for _ in targets]
    async with httpx.AsyncClient(limits=limits) as client:
        for target in targets:
            await chat(client, target, question(0), 16)  # warm-up: pages in the weights
            for who in target.keys:  # and each caller's first request (its key checked)
                await chat(client, target, question(1), 1, who=who)
        if "streams" in args.scenarios:
            # llama.cpp alone, decoding as many rows as a server runs at once: no
            # server streams faster from the same steps.
            ceiling = (
                functools.partial(_ceiling, args.gguf, args.threads)
                if args.gguf is not None and args.ceiling
                else None
            )
            for n in args.streams:
                # And llama.cpp alone getting each round's whole burst out (every prompt,
                # every token), and reading the prompts its median first token needs.
                burst = first = None
                if args.gguf is not None and args.ceiling and n <= BURST_MAX:
                    burst = functools.partial(_burst, args.gguf, args.threads, args.tokens)
                    first = functools.partial(_first, args.gguf, args.threads)
                found = await streams_scenario(
                    client, targets, n, args.tokens, args.rounds, ceiling, burst, first
                )
                for target, result, into in zip(targets, found, out, strict=True):
                    into[f"streams_{n}"] = result
                    print(f"  {target.name} {n} streams: {result}", file=sys.stderr)
        scenarios = (
            ("reading", reading_scenario),
            ("turns", turns_scenario),
            ("users", users_scenario),
            ("fairness", fairness_scenario),
            ("priority", priority_scenario),
        )
        for name, scenario in scenarios:
            if name not in args.scenarios:
                continue
            for target, into in zip(targets, out, strict=True):
                # As before each round of streams: the first request after the other
                # server ran pays for the CPU caches it emptied, and a scenario's first
                # measured request (turn 1 of the chat) must not carry that.
                await chat(client, target, WARM, 1)
                if name == "turns" and target.name == "ferrous":
                    into[name] = await turns_scenario(client, target, args.gguf, args.threads)
                else:
                    into[name] = await scenario(client, target)
                print(f"  {target.name} {name}: {into[name]}", file=sys.stderr)
    return out


def _ferrous_keys(home: str) -> dict[str, str]:
    """API keys of tenants a and b, and a priority-10 key: made with the CLI before start."""
    env = {**os.environ, "FERROUS_HOME": home}
    keys = {}
    for who, extra in (("a", []), ("b", []), ("vip", ["--priority", "10"])):
        command = [sys.executable, "-m", "gateway.cli", "key", "create", "--user", who]
        command += ["--tenant", who, *extra]
        keys[who] = subprocess.run(
            command, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
    return keys


@contextlib.asynccontextmanager
async def ferrous_target(gguf: Path, args: argparse.Namespace) -> AsyncIterator[Target]:
    """``ferrous serve`` with its defaults (auth on, tenants' keys made first)."""
    with tempfile.TemporaryDirectory() as home:
        keys = _ferrous_keys(home)
        proc, port = start_server(
            gguf,
            home=home,
            threads=args.threads,
            workers=args.workers,
            auth=True,
            ready_path="/healthz",
            log=Path(home) / "server.log",
        )
        try:
            # Its default: SEQS_PER_THREAD a thread, as memory allows (it does for SmolLM2).
            slots = SEQS_PER_THREAD * args.threads
            yield Target("ferrous", f"http://127.0.0.1:{port}", "bench", keys, True, slots)
        finally:
            stop_server(proc)


@contextlib.asynccontextmanager
async def llama_server_target(
    binary: Path, gguf: Path, args: argparse.Namespace
) -> AsyncIterator[Target]:
    """``llama-server -np 8`` on the same GGUF and threads (2048 positions per slot)."""
    port = free_port()
    command = [
        *(str(binary), "-m", str(gguf), "-np", "8", "-c", str(8 * 2048)),
        *("-t", str(args.threads), "--host", "127.0.0.1", "--port", str(port)),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient() as probe:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get(f"{base}/health")).status_code == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("llama-server did not start")
                await asyncio.sleep(0.2)
        yield Target("llama-server", base, "bench", slots=8)
    finally:
        stop_server(proc)


def _ratio(a: object, b: object) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 2)
    return None


def table(ours: dict[str, object], ref: dict[str, object]) -> list[list[str]]:
    """Rows of (scenario, metric, ferrous, llama-server, ratio)."""
    rows: list[list[str]] = []
    for scenario, values in ours.items():
        other = ref.get(scenario)
        if not isinstance(values, dict):
            continue
        for metric, value in values.items():
            if isinstance(value, list):
                continue
            theirs = other.get(metric) if isinstance(other, dict) else None
            ratio = _ratio(value, theirs)
            rows.append(
                [
                    scenario,
                    metric,
                    str(value),
                    "" if theirs is None else str(theirs),
                    "" if ratio is None or metric == "ratio" else f"{ratio:.2f}",
                ]
            )
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    from bench.llama_server import find_binary
    from engine.smollm2 import fetch_smollm2

    gguf = Path(args.model) if args.model else fetch_smollm2()
    args.gguf = gguf
    result: dict[str, object] = {
        "model": gguf.name,
        "threads": args.threads,
        "tokens_each": args.tokens,
        "cpus": os.cpu_count(),
    }
    async with contextlib.AsyncExitStack() as stack:
        targets = [await stack.enter_async_context(ferrous_target(gguf, args))]
        if not args.skip_reference:
            binary = find_binary(args.binary)
            if binary is None:
                raise SystemExit("no llama-server found: python -m bench.llama_server build")
            targets.append(await stack.enter_async_context(llama_server_target(binary, gguf, args)))
        found = await measure(targets, args)
    result["ferrous"] = found[0]
    if len(found) > 1:
        result["llama_server"] = found[1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.scheduler", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2)")
    parser.add_argument("--binary", default=None, help="llama-server (default: found or built)")
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 32]
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="bursts per stream count")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--scenarios",
        type=lambda s: set(s.split(",")),
        default={"streams", "turns", "reading", "users", "fairness", "priority"},
    )
    parser.add_argument("--skip-reference", action="store_true", help="ferrous serve only")
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip llama.cpp's own decode rate beside each stream count",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="the table as Markdown")
    parser.add_argument("--from-json", type=Path, help="print the table of an earlier --json run")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = uvloop.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ours = result["ferrous"]
    ref = result.get("llama_server", {})
    assert isinstance(ours, dict) and isinstance(ref, dict)
    if args.markdown:
        print("| scenario | metric | ferrous serve | llama-server -np 8 | ratio |")
        print("|---|---|---|---|---|")
        for row in table(ours, ref):
            print("| " + " | ".join(row) + " |")
        return
    print(f"{'scenario':<12} {'metric':<24} {'ferrous':>10} {'llama-server':>13} {'ratio':>6}")
    for row in table(ours, ref):
        print(f"{row[0]:<12} {row[1]:<24} {row[2]:>10} {row[3]:>13} {row[4]:>6}")


if __name__ == "__main__":
    main()
