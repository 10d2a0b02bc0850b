"""A throwaway redis-server on a unix socket: for benchmarks and the tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

__all__ = ["start_redis"]


def start_redis(binary: str | None, sock: Path) -> subprocess.Popen[bytes]:
    """Start redis-server on ``sock`` and wait until it answers."""
    binary = binary or shutil.which("redis-server") or "redis-server"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(sock.parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return proc
