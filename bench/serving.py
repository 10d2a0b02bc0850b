"""``ferrous serve`` as a subprocess on a loopback port, for the benchmarks that measure it whole."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["free_port", "start_server", "stop_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int, path: str | None) -> bool:
    if path is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start_server(
    model: str | Path,
    *,
    home: str,
    threads: int = 1,
    workers: int = 1,
    seqs: int | None = None,
    name: str = "bench",
    auth: bool = False,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    ready_path: str | None = None,
    more: dict[str, Path] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``ferrous serve`` with ``model`` loaded as ``name``; (process, port) once it answers.

    It answers when its port accepts a connection, or, with ``ready_path``,
    when that path returns 200. ``log`` takes the server's output (else it
    shares this program's); ``env`` adds to this process's environment; ``more``
    loads more models under their names.
    """
    port = free_port()
    full_env = {**os.environ, "FERROUS_HOME": home, **(env or {})}
    if seqs is not None:
        full_env["FERROUS_SEQS_PER_WORKER"] = str(seqs)
    command = [
        *(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)),
        *("--workers", str(workers), "--threads", str(threads)),
        *("--model", f"{name}={model}", "--log-level", "warning"),
        *(arg for other, path in (more or {}).items() for arg in ("--model", f"{other}={path}")),
        *(() if auth else ("--no-auth",)),
    ]
    if log is not None:
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, env=full_env, stdout=out, stderr=out)
    else:
        # Its output goes to our stderr: stdout is for a benchmark's own report (--json).
        proc = subprocess.Popen(command, env=full_env, stdout=sys.stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            where = f"; see {log}" if log is not None else ""
            raise SystemExit(f"the server exited with {proc.returncode}{where}")
        if _ready(port, ready_path):
            return proc, port
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise SystemExit("the server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server (draining), killing it if it takes longer than 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
