"""A real redis-server for the tests, on a unix socket in a temporary directory."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["redis_server"]


@contextmanager
def redis_server(folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``redis-server`` (no persistence, no TCP port): its ``unix://`` URL and process."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / "redis.sock"
    proc = start_redis(binary, sock)
    try:
        yield f"unix://{sock}", proc
    finally:
        proc.terminate()
        proc.wait(10)


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
