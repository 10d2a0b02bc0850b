"""A short smoke run of every load scenario in ``load-tests/locustfile.py`` against a real server.

Locust runs as a subprocess, never imported here: it monkey-patches the
standard library with gevent at import, which would break the asyncio tests
running in this process. The server is a real ``ferrous serve`` on a loopback
port with authentication on, serving the tiny script model, and the token is
minted by ``ferrous token`` as an operator would. Each scenario runs headless
for a few seconds with ``--csv``; the assertions read locust's CSV files, so
they check what a person running the load test would see: the per-generation
rows exist (ttft, itl, tokens/s), and the only failures are the expected ones.

Token budgets are kept small on purpose: the script model has a 2048-token
context shared by the worker's sequences, and several long generations at
once currently fail with ``engine_error`` (KV cache full) rather than ending
with ``length``.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .gateway_helpers import free_port, serve_command, stop_process

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "load-tests" / "locustfile.py"
RUN_SECONDS = 3

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed"
)


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without settings that would change the server or locust under test."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FERROUS_", "LOCUST_")) and not k.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class Server:
    url: str
    token: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, script_model: Path) -> Iterator[Server]:
    """``ferrous serve`` with auth on, one single-threaded worker, the script model as "script"."""
    home = tmp_path_factory.mktemp("load-home")
    env = _clean_env(FERROUS_HOME=str(home))
    port = free_port()
    cli = [sys.executable, "-m", "gateway.cli"]
    log = home / "server.log"  # a file, not a pipe that nobody reads while locust runs
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            serve_command(port, f"script={script_model}"),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        token = subprocess.run(
            [*cli, "token", "--sub", "loadtest", "--ttl", "600"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        yield Server(url, token)
    finally:
        stop_process(proc, timeout=20)


@dataclass
class Run:
    """One locust run: its exit code, output, and the rows of its CSV files."""

    returncode: int
    output: str
    stats: list[dict[str, str]]
    failures: list[dict[str, str]]
    exceptions: list[dict[str, str]]

    def count(self, kind: str, name: str) -> int:
        for row in self.stats:
            if row["Type"] == kind and row["Name"] == name:
                return int(row["Request Count"])
        return 0

    def describe(self) -> str:
        rows = [f"{r['Type']} {r['Name']}: {r['Request Count']}" for r in self.stats]
        problems = [str(f) for f in (*self.failures, *self.exceptions)]
        return "\n".join([*rows, *problems, self.output[-3000:]])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_locust(
    server: Server, out: Path, tag: str, users: int, *args: str, token: str | None = None
) -> Run:
    """Locust headless for RUN_SECONDS with ``--tags tag``; the CSV files go to ``out``."""
    prefix = out / tag
    cmd = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("-u", str(users), "-r", str(users), "-t", f"{RUN_SECONDS}s"),
        *("--host", server.url, "--tags", tag, "--csv", str(prefix), "--only-summary"),
        *("--loglevel", "WARNING", "--ferrous-model", "script", "--ferrous-timeout", "20"),
        *("--ferrous-think-min", "0.05", "--ferrous-think-max", "0.2"),
        *("--ferrous-max-tokens", "32"),
        *args,
    ]
    env = _clean_env(LOCUST_FERROUS_TOKEN=server.token if token is None else token)
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=RUN_SECONDS + 30, cwd=out
    )
    return Run(
        proc.returncode,
        proc.stdout + proc.stderr,
        [r for r in _read_csv(Path(f"{prefix}_stats.csv")) if r["Name"] != "Aggregated"],
        _read_csv(Path(f"{prefix}_failures.csv")),
        _read_csv(Path(f"{prefix}_exceptions.csv")),
    )


def assert_clean(run: Run) -> None:
    assert run.returncode == 0, run.describe()
    assert run.failures == [], run.describe()
    assert run.exceptions == [], run.describe()
    assert all(r["Failure Count"] == "0" for r in run.stats), run.describe()


def assert_generations(run: Run, kind: str, scenario: str, *, rate: bool = True) -> None:
    """The per-generation rows of ``scenario`` exist for transport ``kind``."""
    metrics = ["ttft", "itl", "generation", *(["tokens/s"] if rate else [])]
    for metric in metrics:
        assert run.count(kind, f"{scenario} {metric}") > 0, (kind, metric, run.describe())


def test_steady_chat_reports_per_generation_metrics_for_both_encodings(
    served: Server, tmp_path: Path
) -> None:
    run = run_locust(served, tmp_path, "steady", 2)
    assert_clean(run)
    for kind in ("ws-json", "ws-msgpack"):
        assert_generations(run, kind, "steady")
        assert run.count(kind, "steady connect") >= 1
        assert run.count(kind, "steady hello") >= 1
    # ttft, itl and tokens/s are the only reasons to run this: their rows carry real numbers.
    rates = [r for r in run.stats if r["Name"] == "steady tokens/s"]
    assert all(float(r["Average Response Time"]) > 0 for r in rates), run.describe()


def test_connection_burst_connects_again_and_again(served: Server, tmp_path: Path) -> None:
    run = run_locust(served, tmp_path, "burst", 4)
    assert_clean(run)
    connects = run.count("ws-json", "burst connect") + run.count("ws-msgpack", "burst connect")
    assert connects >= 8, run.describe()  # several sessions per user, not one each
    assert_generations(run, "ws-json", "burst", rate=False)


def test_cancel_storm_reports_cancellation_as_its_own_success(
    served: Server, tmp_path: Path
) -> None:
    run = run_locust(served, tmp_path, "cancel", 2, "--ferrous-cancel-max", "8")
    assert_clean(run)
    cancelled = run.count("ws-json", "cancel cancelled") + run.count(
        "ws-msgpack", "cancel cancelled"
    )
    assert cancelled > 0, run.describe()
    assert run.count("ws-json", "cancel generation") > 0, run.describe()


def test_slow_readers_get_their_whole_generation(served: Server, tmp_path: Path) -> None:
    run = run_locust(
        served,
        tmp_path,
        "slow",
        2,
        *("--ferrous-slow-seconds", "1", "--ferrous-slow-rate", "128"),
        *("--ferrous-slow-max-tokens", "200"),
    )
    assert_clean(run)
    assert run.count("ws-json", "slow connect") > 0, run.describe()
    assert run.count("ws-json", "slow ttfb") > 0, run.describe()
    # max_tokens caps the script model's endless answer: every drained generation ends "length".
    assert run.count("ws-json", "slow finish length") > 0, run.describe()


def test_sse_chat_reports_per_generation_metrics(served: Server, tmp_path: Path) -> None:
    run = run_locust(served, tmp_path, "sse", 2)
    assert_clean(run)
    assert run.count("POST", "/v1/chat/completions") > 0, run.describe()
    assert_generations(run, "sse", "sse")


def test_mixed_runs_websocket_and_http_users_together(served: Server, tmp_path: Path) -> None:
    run = run_locust(served, tmp_path, "mixed", 2, "--ferrous-encoding", "msgpack")
    assert_clean(run)
    assert_generations(run, "ws-msgpack", "steady")
    assert_generations(run, "sse", "sse")


def test_a_bad_token_is_counted_by_error_code(served: Server, tmp_path: Path) -> None:
    run = run_locust(served, tmp_path, "steady", 1, token="not-a-token")
    assert run.returncode == 1, run.describe()  # locust's exit code when requests failed
    errors = {(f["Name"], f["Error"]) for f in run.failures}
    assert errors == {("steady connect", "handshake 401 unauthorized")}, run.describe()
    assert run.count("ws-json", "steady generation") == 0, run.describe()
