"""A local HTTP file server for tests: serves one payload and misbehaves on demand.

Honours or ignores Range, drops connections mid-body, trickles bodies, answers
fixed error statuses, and records every request it saw.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAYLOAD = random.Random(20240607).randbytes(3 * 1024 * 1024)
PIECE = 64 * 1024


@dataclass
class Seen:
    """One request as the server saw it."""

    range: str | None
    if_range: str | None
    status: int = 0
    sent: int = 0  # body bytes written
    path: str = ""
    authorization: str | None = None
    method: str = "GET"


@dataclass
class Behaviour:
    payload: bytes = PAYLOAD
    honour_range: bool = True
    etag: str | None = '"v1"'
    status: int | None = None  # answer every request with this status and no body
    fail_requests: int = 0  # ... or only the first N requests
    drop_after: int = 0  # body bytes sent before the connection is cut ...
    drop_requests: int = 0  # ... on the first N requests
    slow_requests: int = 0  # the first N requests trickle the body
    slow_delay: float = 0.05  # seconds between pieces of a slow body
    linked_etag: str | None = None  # sent on HEAD, as the Hugging Face Hub does for LFS files
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self) -> int:
        with self.lock:
            return sum(r.sent for r in self.requests)

    def bodies(self) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.sent]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        b = self.server.behaviour
        with b.lock:
            b.requests.append(
                Seen(
                    None,
                    None,
                    path=self.path,
                    authorization=self.headers.get("Authorization"),
                    method="HEAD",
                )
            )
        self.send_response(200)
        self.send_header("Content-Length", str(len(b.payload)))
        if b.linked_etag is not None:
            self.send_header("X-Linked-Etag", f'"{b.linked_etag}"')
        self.end_headers()

    def do_GET(self) -> None:
        b = self.server.behaviour
        seen = Seen(
            self.headers.get("Range"),
            self.headers.get("If-Range"),
            path=self.path,
            authorization=self.headers.get("Authorization"),
            method=self.command,
        )
        with b.lock:
            n = len(b.requests)
            b.requests.append(seen)
        if b.status is not None and (b.fail_requests == 0 or n < b.fail_requests):
            seen.status = b.status
            self.send_response(b.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, start, status = b.payload, 0, 200
        rng = seen.range
        if rng and b.honour_range and (seen.if_range is None or seen.if_range == b.etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                seen.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        part = body[start:]
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes" if b.honour_range else "none")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if b.etag is not None:
            self.send_header("ETag", b.etag)
        self.end_headers()
        if n < b.drop_requests:
            part = part[: b.drop_after]
            self.close_connection = True  # the socket closes short of Content-Length
        try:
            for i in range(0, len(part), PIECE):
                self.wfile.write(part[i : i + PIECE])
                with b.lock:
                    seen.sent += len(part[i : i + PIECE])
                if n < b.slow_requests:
                    time.sleep(b.slow_delay)
            self.wfile.flush()
        except OSError:  # the client went away (killed, or gave up)
            self.close_connection = True


@dataclass
class Server:
    url: str
    behaviour: Behaviour


@contextlib.contextmanager
def serve_payload(payload: bytes = PAYLOAD, path: str = "/model.gguf") -> Iterator[Server]:
    """Serve ``payload`` at ``path`` (any path, in fact) on a loopback port."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.behaviour = Behaviour(payload=payload)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}{path}", httpd.behaviour)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
