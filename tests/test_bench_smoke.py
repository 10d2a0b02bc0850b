"""Every benchmark runs: a tiny model, one round, and its JSON carries the figures it promises.

Figures are not judged here (timings belong to the benchmarks); what is checked
is that each module still runs end to end against the current code, reports its
keys, and that a ratio it prints is computed from the figures it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(module: str, *args: str, timeout: float = 240) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    return result


def test_bench_concurrency(script_model: Path) -> None:
    r = bench(
        "concurrency",
        *("--model", str(script_model), "--tokens", "8", "--streams", "1,2"),
        *("--runs", "1", "--threads", "1"),
    )
    assert r["aggregate_tok_s_1"] > 0 and r["aggregate_tok_s_2"] > 0  # type: ignore[operator]


@pytest.mark.parametrize(("module", "ours"), [("engine", "pool_tok_s"), ("gateway", "ws_tok_s")])
def test_bench_engine_and_gateway_against_direct_llama_cpp(
    script_model: Path, module: str, ours: str
) -> None:
    r = bench(
        module, "--model", str(script_model), "--tokens", "8", "--runs", "1", "--threads", "1"
    )
    direct, measured = r["direct_tok_s"], r[ours]
    assert isinstance(direct, float) and isinstance(measured, float) and direct > 0
    assert r["ratio"] == pytest.approx(measured / direct, rel=1e-3)


def test_bench_idle_and_slow_clients() -> None:
    idle = bench("idle", "--sessions", "20", "--new", "5", "--tokens", "10", "--runs", "1")
    assert idle["sessions"] == 20 and idle["handshake_p99_ms"] > 0  # type: ignore[operator]
    ratio = idle["itl_p99_ms_loaded"] / idle["itl_p99_ms_idle_server"]  # type: ignore[operator]
    assert idle["itl_p99_ratio"] == pytest.approx(ratio, abs=2e-3)
    slow = bench("slowclients", "--clients", "10", "--tokens", "10", "--runs", "1")
    ratio = slow["itl_p99_ms_loaded"] / slow["itl_p99_ms_baseline"]  # type: ignore[operator]
    assert slow["itl_p99_ratio"] == pytest.approx(ratio, abs=2e-3)


def test_bench_scheduler(script_model: Path) -> None:
    r = bench(
        "scheduler",
        *("--model", str(script_model), "--skip-reference", "--streams", "1,2"),
        *("--tokens", "8", "--rounds", "1", "--threads", "1", "--scenarios", "streams,turns"),
    )
    ours = r["ferrous"]
    assert isinstance(ours, dict)
    assert set(ours) == {"streams_1", "streams_2", "turns"}
    streams = ours["streams_2"]
    assert isinstance(streams, dict) and streams["aggregate_tok_s"] > 0
    assert {"ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p99_ms"} <= set(streams)
    turns = ours["turns"]
    assert isinstance(turns, dict) and len(turns["ttft_ms"]) == 10
    assert turns["turn10_over_turn1"] == round(turns["turn10_ttft_ms"] / turns["turn1_ttft_ms"], 2)


def test_bench_readcost(script_model: Path) -> None:
    from bench.readcost import read_ms

    first, later = read_ms(script_model, [(8, 4), (200, 4)], threads=1, n_seq=2, repeats=2)
    assert first > 0 and later > 0
