"""nginx in front of local replicas, with the shipped configuration (``deploy/nginx.conf``).

Only what cannot be the same on a test machine is changed: the upstream
servers (as many as given, on loopback ports), the listening address, one
worker process, and where its pid, log and temporary files go. The WebSocket
upgrade, the unbuffered streams and the consistent hash are the file's own.
Used by the test suite and by ``bench.replicas``.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DEPLOY", "nginx_binary", "running_nginx"]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_config(upstreams: list[int], port: int) -> str:
    """``deploy/nginx.conf`` for ``upstreams`` (loopback ports), listening on ``port``."""
    conf = (DEPLOY / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server node\d+:11480[^;]*;\n", conf, flags=re.MULTILINE)
    if not servers:
        raise ValueError("deploy/nginx.conf lists no node servers")
    options = servers[0].split(":11480", 1)[1]  # "max_fails=2 fail_timeout=5s;\n"
    indent = servers[0][: len(servers[0]) - len(servers[0].lstrip())]
    lines = "".join(f"{indent}server 127.0.0.1:{p}{options}" for p in upstreams)
    conf = conf.replace("".join(servers), lines)
    conf = conf.replace("listen 11480;", f"listen 127.0.0.1:{port};")
    return conf.replace("worker_processes auto;", "worker_processes 1;")


@contextlib.contextmanager
def running_nginx(folder: Path, upstreams: list[int]) -> Iterator[int]:
    """Run nginx before ``upstreams`` until the block ends; yields its port."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (folder / "nginx.conf").write_text(render_config(upstreams, port))
    settings = f"daemon off; pid {folder}/nginx.pid; error_log {folder}/error.log;"
    proc = subprocess.Popen(
        [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", settings],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = folder / "error.log"
                    raise RuntimeError(
                        "nginx did not start: " + (log.read_text() if log.exists() else "")
                    ) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
