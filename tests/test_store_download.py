"""The resumable downloader against a real local HTTP server that misbehaves on demand."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.store.download import Downloader, Progress
from engine.store.errors import StoreError

from .fileserver import PAYLOAD, Server, serve_payload

DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[Server]:
    with serve_payload() as s:
        yield s


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


# -- tests ------------------------------------------------------------------------


async def test_plain_download(server: Server, tmp_path: Path) -> None:
    d = Downloader(tmp_path / "partial")
    got = await d.fetch(server.url, expected_sha256=DIGEST)
    assert got.sha256 == DIGEST
    assert got.size == len(PAYLOAD)
    assert got.resumed_from == 0
    assert got.path.parent == tmp_path / "partial"
    assert got.path.read_bytes() == PAYLOAD
    assert len(server.behaviour.requests) == 1
    assert server.behaviour.requests[0].range is None


async def test_resume_after_dropped_connection(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.drop_requests, b.drop_after = 1, 1_200_000
    got = await Downloader(tmp_path, backoff=0.01).fetch(server.url, expected_sha256=DIGEST)
    assert got.path.read_bytes() == PAYLOAD
    assert [r.range for r in b.requests] == [None, "bytes=1200000-"]
    assert b.requests[1].if_range == '"v1"'
    assert b.requests[1].status == 206
    assert b.sent() == len(PAYLOAD)  # nothing fetched twice


async def test_resume_without_expected_digest_uses_etag(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.drop_requests, b.drop_after = 2, 700_000
    got = await Downloader(tmp_path, backoff=0.01).fetch(server.url)
    assert got.sha256 == DIGEST
    assert [r.range for r in b.requests] == [None, "bytes=700000-", "bytes=1400000-"]
    assert b.sent() == len(PAYLOAD)


async def test_resume_after_process_killed(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.slow_requests, b.slow_delay = 1, 0.05  # ~2.4 s for the whole body
    partial_dir = tmp_path / "partial"
    code = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        from engine.store.download import Downloader

        d = Downloader(Path(sys.argv[1]), chunk_size=64 * 1024)
        asyncio.run(d.fetch(sys.argv[2], expected_sha256=sys.argv[3]))
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(partial_dir), server.url, DIGEST],
        cwd=REPO,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    partial = partial_dir / f"{DIGEST}.partial"
    try:
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size > 300_000):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never wrote a partial"
            await asyncio.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    on_disk = partial.stat().st_size
    assert 0 < on_disk < len(PAYLOAD)

    got = await Downloader(partial_dir).fetch(server.url, expected_sha256=DIGEST)
    assert got.sha256 == DIGEST
    assert got.path.read_bytes() == PAYLOAD
    assert got.resumed_from == on_disk
    assert b.requests[-1].range == f"bytes={on_disk}-"
    assert b.requests[-1].status == 206


async def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.honour_range = False
    b.drop_requests, b.drop_after = 1, 1_000_000
    d = Downloader(tmp_path, retries=0)
    with pytest.raises(StoreError) as info:
        await d.fetch(server.url, expected_sha256=DIGEST)
    assert info.value.reason == "network"
    assert (tmp_path / f"{DIGEST}.partial").stat().st_size == 1_000_000  # kept to resume

    got = await d.fetch(server.url, expected_sha256=DIGEST)
    assert b.requests[1].range == "bytes=1000000-"
    assert b.requests[1].status == 200
    assert got.resumed_from == 1_000_000
    assert got.size == len(PAYLOAD)
    assert got.path.read_bytes() == PAYLOAD  # no duplicated prefix


async def test_wrong_bytes_are_discarded(server: Server, tmp_path: Path) -> None:
    wrong = bytearray(PAYLOAD)
    wrong[12345] ^= 0xFF
    server.behaviour.payload = bytes(wrong)
    actual = hashlib.sha256(wrong).hexdigest()
    with pytest.raises(StoreError) as info:
        await Downloader(tmp_path).fetch(server.url, expected_sha256=DIGEST)
    err = info.value
    assert err.reason == "digest_mismatch"
    assert DIGEST in err.message and actual in err.message and server.url in err.message
    assert not (tmp_path / f"{DIGEST}.partial").exists()
    assert not (tmp_path / f"{DIGEST}.json").exists()


async def test_concurrent_fetches_share_one_download(server: Server, tmp_path: Path) -> None:
    d = Downloader(tmp_path)
    one, two = await asyncio.gather(
        d.fetch(server.url, expected_sha256=DIGEST), d.fetch(server.url, expected_sha256=DIGEST)
    )
    assert one == two
    assert one.path.read_bytes() == PAYLOAD
    assert len(server.behaviour.bodies()) == 1


async def test_cancelled_waiter_does_not_cancel_the_other(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.slow_requests, b.slow_delay = 1, 0.005
    d = Downloader(tmp_path)
    first = asyncio.create_task(d.fetch(server.url))
    second = asyncio.create_task(d.fetch(server.url))
    while not b.requests:
        await asyncio.sleep(0.01)
    first.cancel()
    got = await second
    assert first.cancelled()
    assert got.sha256 == DIGEST
    assert len(b.requests) == 1


async def test_cancelled_download_keeps_its_partial(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.slow_requests, b.slow_delay = 1, 0.01
    d = Downloader(tmp_path, chunk_size=64 * 1024)
    task = asyncio.create_task(d.fetch(server.url, expected_sha256=DIGEST))
    while b.sent() < 500_000:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    got = await d.fetch(server.url, expected_sha256=DIGEST)  # right away: a new download
    assert got.path.read_bytes() == PAYLOAD
    assert got.resumed_from > 0
    assert b.requests[-1].range == f"bytes={got.resumed_from}-"
    assert not (tmp_path / f"{DIGEST}.lock").exists()


async def test_lock_waiter_reuses_the_finished_file(server: Server, tmp_path: Path) -> None:
    """Two downloaders (as two processes would) serialise on the lock; the second fetches nothing."""
    b = server.behaviour
    b.slow_requests, b.slow_delay = 1, 0.005
    one, two = await asyncio.gather(
        Downloader(tmp_path).fetch(server.url, expected_sha256=DIGEST),
        Downloader(tmp_path).fetch(server.url, expected_sha256=DIGEST),
    )
    assert one.sha256 == two.sha256 == DIGEST
    assert sorted([one.resumed_from, two.resumed_from]) == [0, len(PAYLOAD)]
    assert len(b.requests) == 1
    assert not (tmp_path / f"{DIGEST}.lock").exists()


async def test_complete_partial_answered_416(server: Server, tmp_path: Path) -> None:
    d = Downloader(tmp_path)
    first = await d.fetch(server.url)
    again = await d.fetch(server.url)
    assert again.sha256 == first.sha256 == DIGEST
    assert again.resumed_from == len(PAYLOAD)
    assert server.behaviour.requests[1].range == f"bytes={len(PAYLOAD)}-"
    assert server.behaviour.requests[1].status == 416
    assert server.behaviour.sent() == len(PAYLOAD)


async def test_not_found(server: Server, tmp_path: Path) -> None:
    server.behaviour.status = 404
    with pytest.raises(StoreError) as info:
        await Downloader(tmp_path).fetch(server.url)
    assert info.value.reason == "not_found"
    assert server.url in info.value.message
    assert len(server.behaviour.requests) == 1


async def test_forbidden(server: Server, tmp_path: Path) -> None:
    server.behaviour.status = 403
    with pytest.raises(StoreError) as info:
        await Downloader(tmp_path).fetch(server.url)
    assert info.value.reason == "http"
    assert "credentials" in info.value.message


async def test_server_error_is_retried(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.status, b.fail_requests = 503, 2
    got = await Downloader(tmp_path, backoff=0.01).fetch(server.url, expected_sha256=DIGEST)
    assert got.sha256 == DIGEST
    assert [r.status for r in b.requests] == [503, 503, 200]


async def test_always_dropping_server_gives_network_error(server: Server, tmp_path: Path) -> None:
    b = server.behaviour
    b.drop_requests, b.drop_after = 1_000_000, 0
    with pytest.raises(StoreError) as info:
        await Downloader(tmp_path, retries=2, backoff=0.01).fetch(server.url)
    assert info.value.reason == "network"
    assert info.value.retryable
    assert len(b.requests) == 3


def test_disk_full(server: Server, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import asyncio, resource, signal, sys
        from pathlib import Path
        from engine.store.download import Downloader
        from engine.store.errors import StoreError

        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            asyncio.run(Downloader(Path(sys.argv[1])).fetch(sys.argv[2]))
        except StoreError as exc:
            print(exc.reason)
            print(exc.message)
        else:
            print("no error")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "partial"), server.url],
        cwd=REPO,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    reason, message = done.stdout.splitlines()[:2]
    assert reason == "disk_full", done.stdout
    assert "no space left" in message and server.url in message


async def test_unwritable_partial_dir(server: Server, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError) as info:
        await Downloader(blocker / "partial").fetch(server.url)
    assert info.value.reason in ("permission", "io")
    assert f"downloading {server.url}" in info.value.message
    assert "partial" in info.value.message  # the file's own name, not the server's path
    assert str(tmp_path) not in info.value.message
    assert not server.behaviour.requests


async def test_progress(server: Server, tmp_path: Path) -> None:
    seen: list[Progress] = []
    got = await Downloader(tmp_path, chunk_size=64 * 1024).fetch(
        server.url, expected_sha256=DIGEST, progress=seen.append
    )
    assert got.size == len(PAYLOAD)
    downloading = [p for p in seen if p.status == "downloading"]
    done = [p.completed for p in downloading]
    assert done == sorted(done)
    assert done[0] == 0 and done[-1] == len(PAYLOAD)
    assert all(p.total == len(PAYLOAD) for p in seen)
    assert seen[-1] == Progress("verifying", len(PAYLOAD), len(PAYLOAD))
    assert len(seen) < 50


async def test_a_page_instead_of_a_model_is_refused_at_its_first_bytes(
    server: Server, tmp_path: Path
) -> None:
    """A source that serves an HTML page is refused as its first bytes arrive (the 3 MB
    body is not fetched), and nothing of it stays behind."""
    server.behaviour.payload = b"<!DOCTYPE html><html>" + PAYLOAD
    server.behaviour.slow_requests, server.behaviour.slow_delay = 1, 0.05  # 48 pieces, ~2.4 s
    d = Downloader(tmp_path / "partial", retries=3)
    with pytest.raises(StoreError) as e:
        await d.fetch(server.url, expect_start=b"GGUF")
    assert e.value.reason == "source" and "does not serve a model file" in e.value.message
    assert len(server.behaviour.requests) == 1  # not retried
    assert server.behaviour.sent() < len(server.behaviour.payload) // 2
    assert list((tmp_path / "partial").glob("*.partial")) == []
    assert list((tmp_path / "partial").glob("*.json")) == []


async def test_a_host_that_does_not_resolve_is_not_retried(tmp_path: Path) -> None:
    d = Downloader(tmp_path / "partial", retries=5, backoff=5.0)
    with pytest.raises(StoreError) as e:
        async with asyncio.timeout(30):  # five retries with backoff would take minutes
            await d.fetch("http://no-such-host.invalid/model.gguf")
    assert "does not resolve" in e.value.message
