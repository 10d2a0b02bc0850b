"""Soak: a steady chat load against `ferrous serve` for minutes, watching for leaks.

    python -m bench.soak [--minutes 10] [--model PATH] [--sessions 4] [--json]

The server runs as its own process (``ferrous serve`` on a loopback port, no auth,
SmolLM2-135M-Instruct unless ``--model``). ``--sessions`` SDK clients
(:class:`ferrous_client.FerrousClient`) chat with think time: each keeps a
conversation for a few turns, then forgets it and starts a new one (so the
prompt, and with it the legitimate memory of a conversation, stays bounded); every
``--cancel-every``-th turn is cancelled on purpose after its first tokens.

With ``--load locust`` the load is ``load-tests/locustfile.py`` instead, run as a
``locust`` subprocess (``SteadyChatUser`` and ``CancelStormUser``, ``--sessions``
users in all, spread evenly over the two), and requests and failures are read
from its CSV files.

Every few seconds it samples the gateway and worker processes (psutil): resident
memory, open file descriptors, threads; the ring segments in /dev/shm that carry
the gateway's pid; and the ``ferrous_active_sessions`` / ``ferrous_active_generations``
gauges of ``/metrics``, and its ``ferrous_asyncio_tasks`` gauge (tasks alive in the
gateway's event loop).

Pass means, after the warm-up (the first quarter of the run, at most 60 s):

* ``no_failed_requests`` — no request failed except the ones cancelled on purpose;
* ``rss_growth_lt_5pct`` — mean RSS of the last samples is < 5 % above the mean of the
  first samples after warm-up, for the gateway and for the workers;
* ``fds_stable`` / ``threads_stable`` / ``tasks_stable`` — the lowest of the last samples
  is not above the largest of the first ones (gateway and workers; tasks: the gateway's).
  These counts move with the generations in flight when a sample is taken (a ring
  descriptor, a task each); a leak raises their floor, which is what is compared;
* ``shm_stable`` — never more ring segments than generations can run at once, and
  none left once the load stopped;
* ``workers_not_restarted`` — the same worker processes from start to end.

The JSON (``--json``) holds the RSS curve, the start/end of every series, the
failures (first ten), and pass/fail per criterion; the exit status is 0 on pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from ferrous_client import FerrousClient, FerrousClientError

from bench.serving import start_server, stop_server
from engine.rings import SHM_DIR, SHM_PREFIX

MIB = 1024 * 1024
PROMPTS = (
    "Why is the sky blue?",
    "Name three uses of copper.",
    "Write a haiku about rain.",
    "What is a prime number?",
    "Give me a tip for learning to cook.",
    "Explain what a compiler does.",
)


# -- the server -----------------------------------------------------------------------------


# -- the load -------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0  # on purpose
    tokens: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoadSpec:
    url: str
    sessions: int
    think: float
    max_tokens: int
    turns: int  # per conversation, then it is forgotten
    cancel_every: int  # 0 = never
    timeout: float  # one turn, from request to done


async def _session(spec: LoadSpec, n: int, tally: Tally, stop: asyncio.Event) -> None:
    """One chatting client until ``stop``; every problem is a failure in ``tally``."""
    rng = random.Random(n)
    options = {"max_tokens": spec.max_tokens, "temperature": 0.7, "seed": n}
    try:
        client = await FerrousClient.connect_with_retry(spec.url, attempts=3)
    except FerrousClientError as exc:
        tally.failures.append(f"session {n}: cannot connect: {exc!r}")
        return
    try:
        conversation: str | None = None
        turn = 0
        while not stop.is_set():
            turn += 1
            tally.requests += 1
            cancel = spec.cancel_every > 0 and tally.requests % spec.cancel_every == 0
            gen = client.chat(
                "soak", rng.choice(PROMPTS), conversation=conversation, options=options
            )
            try:
                async with asyncio.timeout(spec.timeout):
                    seen = 0
                    async for _ in gen:
                        seen += 1
                        if cancel and seen == 2:
                            await gen.cancel()
            except (FerrousClientError, TimeoutError) as exc:
                tally.failures.append(f"session {n} turn {turn}: {exc!r}")
                if not client.connected:
                    return
            else:
                reason = gen.finish_reason
                if reason == "cancelled" and cancel:
                    tally.cancelled += 1
                elif reason in ("stop", "length"):  # a cancel may also cross the end
                    tally.completed += 1
                else:
                    tally.failures.append(f"session {n} turn {turn}: finish reason {reason}")
                if gen.usage is not None:
                    tally.tokens += gen.usage.completion_tokens
                conversation = gen.conversation
            if turn % spec.turns == 0 and conversation is not None:
                await client.forget(conversation)
                conversation = None
            think = spec.think * rng.uniform(0.5, 1.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), think)
    finally:
        await client.close()


LOCUSTFILE = Path(__file__).resolve().parent.parent / "load-tests" / "locustfile.py"


async def _locust_load(
    spec: LoadSpec, http_url: str, duration: float, workdir: Path, tally: Tally
) -> None:
    """The locust scenarios for ``duration`` seconds; totals and failures from its CSV."""
    prefix = workdir / "locust"
    env = {
        **os.environ,
        "LOCUST_FERROUS_MODEL": "soak",
        "LOCUST_FERROUS_MAX_TOKENS": str(spec.max_tokens),
        "LOCUST_FERROUS_THINK_MIN": str(spec.think * 0.5),
        "LOCUST_FERROUS_THINK_MAX": str(spec.think * 1.5),
        "LOCUST_FERROUS_TURNS": str(spec.turns),
        "LOCUST_FERROUS_TIMEOUT": str(spec.timeout),
    }
    with open(workdir / "locust.log", "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
            *("-u", str(spec.sessions), "-r", str(spec.sessions)),
            *("-t", f"{max(1, round(duration))}s", "--stop-timeout", str(round(spec.timeout))),
            *("--host", http_url, "--csv", str(prefix), "--only-summary"),
            *("SteadyChatUser", "CancelStormUser"),
            env=env,
            stdout=out,
            stderr=out,
        )
        try:
            await asyncio.wait_for(proc.wait(), duration + spec.timeout + 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            tally.failures.append("locust did not stop in time")
    try:
        with open(f"{prefix}_stats.csv", newline="") as f:
            for row in csv.DictReader(f):
                name = row["Name"]
                if name.endswith(" generation"):
                    tally.requests += int(row["Request Count"])
                    tally.completed += int(row["Request Count"]) - int(row["Failure Count"])
                elif name == "cancel cancelled":
                    tally.cancelled += int(row["Request Count"])
        tally.completed -= tally.cancelled  # cancelled generations are not failures there either
        with open(f"{prefix}_failures.csv", newline="") as f:
            for row in csv.DictReader(f):
                for _ in range(min(10, int(row["Occurrences"]))):
                    tally.failures.append(f"{row['Method']} {row['Name']}: {row['Error']}")
    except (OSError, KeyError, ValueError) as exc:
        tally.failures.append(f"locust left no usable CSV ({exc!r}); see {workdir}/locust.log")


# -- sampling -------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    gateway_rss: int
    worker_rss: int
    gateway_fds: int
    worker_fds: int
    gateway_threads: int
    worker_pids: tuple[int, ...]
    shm_segments: int
    sessions_gauge: float
    generations_gauge: float
    tasks_gauge: float = -1.0


def _workers(server: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "engine.worker" in p.cmdline():
                found.append(p)
    return found


def _gauges(http_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = {}
    for name in ("ferrous_active_sessions", "ferrous_active_generations", "ferrous_asyncio_tasks"):
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else -1.0
    return found


async def sample(server: psutil.Process, http_url: str, t0: float) -> Sample:
    """One reading; the /metrics scrape comes last so its connection is not counted."""
    workers = _workers(server)
    rss = fds = 0
    for w in workers:
        with contextlib.suppress(psutil.Error):
            rss += w.memory_info().rss
            fds += w.num_fds()
    segments = sum(1 for _ in SHM_DIR.glob(f"{SHM_PREFIX}{server.pid}-*"))
    s = Sample(
        t=round(time.monotonic() - t0, 2),
        gateway_rss=server.memory_info().rss,
        worker_rss=rss,
        gateway_fds=server.num_fds(),
        worker_fds=fds,
        gateway_threads=server.num_threads(),
        worker_pids=tuple(sorted(w.pid for w in workers)),
        shm_segments=segments,
        sessions_gauge=-1.0,
        generations_gauge=-1.0,
    )
    with contextlib.suppress(OSError):
        g = await asyncio.to_thread(_gauges, http_url)
        s.sessions_gauge = g["ferrous_active_sessions"]
        s.generations_gauge = g["ferrous_active_generations"]
        s.tasks_gauge = g["ferrous_asyncio_tasks"]
    return s


# -- the verdict ----------------------------------------------------------------------------


def _windows(values: list[float], k: int) -> tuple[list[float], list[float]]:
    return values[:k], values[-k:]


def _series(samples: list[Sample], attr: str, k: int, scale: float = 1.0) -> dict[str, Any]:
    values = [getattr(s, attr) / scale for s in samples]
    first, last = _windows(values, k)
    start, end = statistics.fmean(first), statistics.fmean(last)
    return {
        "start": round(start, 2),
        "end": round(end, 2),
        "first_max": round(max(first), 2),
        "last_min": round(min(last), 2),
        "growth_pct": round(100.0 * (end - start) / start, 2) if start else 0.0,
    }


def verdict(
    samples: list[Sample], warmup: float, tally: Tally, max_rings: int, after: Sample
) -> dict[str, Any]:
    """Criteria over the samples taken after ``warmup`` seconds."""
    steady = [s for s in samples if s.t >= warmup] or samples
    k = max(2, len(steady) // 4)
    rss = {
        "gateway_mib": _series(steady, "gateway_rss", k, MIB),
        "workers_mib": _series(steady, "worker_rss", k, MIB),
    }
    fds = {
        "gateway": _series(steady, "gateway_fds", k),
        "workers": _series(steady, "worker_fds", k),
    }
    threads = {"gateway": _series(steady, "gateway_threads", k)}
    tasks = _series(steady, "tasks_gauge", k)
    pids = {s.worker_pids for s in [*samples, after]}
    criteria = {
        "no_failed_requests": not tally.failures,
        "rss_growth_lt_5pct": all(v["growth_pct"] < 5.0 for v in rss.values()),
        # Counts move with the generations in flight at each sample (a ring fd, a task);
        # a leak raises their floor: the lowest of the last samples is compared.
        "fds_stable": all(v["last_min"] <= v["first_max"] for v in fds.values()),
        "threads_stable": all(v["last_min"] <= v["first_max"] for v in threads.values()),
        "tasks_stable": tasks["last_min"] <= tasks["first_max"],
        "shm_stable": max(s.shm_segments for s in samples) <= max_rings and after.shm_segments == 0,
        "workers_not_restarted": len(pids) == 1,
    }
    return {
        "samples": len(samples),
        "steady_samples": len(steady),
        "window": k,
        "rss": rss,
        "rss_curve": [
            [s.t, round(s.gateway_rss / MIB, 1), round(s.worker_rss / MIB, 1)] for s in samples
        ],
        "fds": fds,
        "tasks": {
            "measure": "ferrous_asyncio_tasks from /metrics (tasks alive in the gateway's "
            "loop), the gateway's thread count, and the session and generation gauges",
            "asyncio_tasks": tasks,
            "threads": threads,
            "sessions_gauge": [samples[0].sessions_gauge, samples[-1].sessions_gauge],
            "generations_gauge_max": max(s.generations_gauge for s in samples),
            "generations_gauge_after": after.generations_gauge,
        },
        "shm_segments": {
            "max_during": max(s.shm_segments for s in samples),
            "limit": max_rings,
            "after": after.shm_segments,
        },
        "worker_pids": sorted({p for ps in pids for p in ps}),
        "criteria": criteria,
        "pass": all(criteria.values()),
    }


# -- the run --------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(args: argparse.Namespace, model: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    with tempfile.TemporaryDirectory(prefix="ferrous-soak-") as home:
        proc, port = start_server(
            model,
            home=home,
            workers=args.workers,
            threads=args.threads,
            seqs=max(4, args.sessions),
            name="soak",
            log=Path(args.server_log or os.path.join(home, "server.log")),
        )
        try:
            yield proc, port
        finally:
            stop_server(proc)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model
    if model is None:
        from engine.smollm2 import fetch_smollm2

        model = str(fetch_smollm2())
    duration = args.minutes * 60.0
    interval = args.interval or max(1.0, min(5.0, duration / 30))
    warmup = args.warmup if args.warmup is not None else min(60.0, duration / 4)
    with _server(args, model) as (proc, port):
        server = psutil.Process(proc.pid)
        spec = LoadSpec(
            url=f"ws://127.0.0.1:{port}/v1/ws",
            sessions=args.sessions,
            think=args.think,
            max_tokens=args.max_tokens,
            turns=args.turns,
            cancel_every=args.cancel_every,
            timeout=args.turn_timeout,
        )
        http_url = f"http://127.0.0.1:{port}"
        tally = Tally()
        stop = asyncio.Event()
        t0 = time.monotonic()
        if args.load == "locust":
            workdir = Path(tempfile.mkdtemp(prefix="ferrous-soak-locust-"))
            load = _locust_load(spec, http_url, duration, workdir, tally)
            sessions = [asyncio.create_task(load)]
            stop_wait = duration + spec.timeout + 70  # locust stops by its own clock
        else:
            sessions = [
                asyncio.create_task(_session(spec, n, tally, stop)) for n in range(spec.sessions)
            ]
            stop_wait = spec.timeout + 10
        samples: list[Sample] = []
        try:
            while (elapsed := time.monotonic() - t0) < duration:
                await asyncio.sleep(min(interval, max(0.0, duration - elapsed)))
                if proc.poll() is not None:
                    tally.failures.append(f"the server exited with {proc.returncode}")
                    break
                samples.append(await sample(server, http_url, t0))
        finally:
            stop.set()
            done, pending = await asyncio.wait(sessions, timeout=stop_wait)
            for task in pending:
                task.cancel()
                tally.failures.append("a session did not stop in time")
            for task in done:
                if task.exception() is not None:
                    tally.failures.append(f"a session crashed: {task.exception()!r}")
        # Quiet: every ring must be gone once nothing runs (closed sessions end theirs).
        after = await sample(server, http_url, t0)
        deadline = time.monotonic() + 10
        while (after.shm_segments or after.generations_gauge > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = await sample(server, http_url, t0)
        if not samples:
            raise SystemExit("no samples: the run was shorter than one interval")
        result: dict[str, Any] = {
            "model": Path(model).name,
            "server_pid": proc.pid,
            "minutes": args.minutes,
            "duration_s": round(time.monotonic() - t0, 1),
            "sessions": spec.sessions,
            "workers": args.workers,
            "threads": args.threads,
            "interval_s": interval,
            "warmup_s": warmup,
            "load": (
                f"locust {LOCUSTFILE.name}: SteadyChatUser + CancelStormUser"
                if args.load == "locust"
                else "asyncio SDK sessions in bench/soak.py"
            ),
            "requests": {
                "total": tally.requests,
                "completed": tally.completed,
                "cancelled_on_purpose": tally.cancelled,
                "failed": len(tally.failures),
                "failures": tally.failures[:10],
                # The locust scenarios do not count tokens (their rows are per generation).
                "tokens": tally.tokens if args.load == "asyncio" else None,
            },
        }
        max_rings = args.sessions  # one generation at a time per session
        result.update(verdict(samples, warmup, tally, max_rings, after))
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--think", type=float, default=0.5, help="mean seconds between turns")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--cancel-every", type=int, default=7, help="cancel every Nth turn (0: no)")
    parser.add_argument("--turn-timeout", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: a quarter)")
    parser.add_argument("--server-log", default=None, help="keep the server's output here")
    parser.add_argument(
        "--load",
        choices=("asyncio", "locust"),
        default="asyncio",
        help="who drives the load: this program's SDK sessions, or load-tests/locustfile.py",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "rss_curve":
                print(f"{key:>16}: {value}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
