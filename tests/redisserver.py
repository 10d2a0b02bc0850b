"""A real redis-server for the tests, on a unix socket in a temporary directory."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.redis_server import start_redis

__all__ = ["redis_server", "start_redis"]


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
