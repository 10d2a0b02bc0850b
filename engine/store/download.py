"""Resumable, verifying HTTP downloads of model files into the store's ``partial/`` directory.

Model files are gigabytes, connections drop and processes get killed, so a
download is continued rather than started over whenever that is safe, and the
result is always hashed in full before anyone trusts it.

Each download has a key: the expected sha256 when the caller knows it (the same
blob fetched from two URLs shares one partial) or else the sha256 of the URL.
Under ``partial_dir`` it owns three files::

    <key>.partial   the bytes received so far, always a prefix of the resource
    <key>.json      sidecar: url, etag, last_modified, total (replaced atomically)
    <key>.lock      flock'ed for the duration of a download (one per key across processes)

Partials survive failures and kills. A later call, in any process, hashes the
prefix already on disk and asks for the rest with ``Range`` (plus ``If-Range``
with the validator from the sidecar, so a changed resource comes back whole as
a 200 instead of being spliced). A prefix is only continued when something can
catch a splice: a validator for ``If-Range`` or an expected digest; otherwise
the download starts from byte 0.

Dropped connections, timeouts, 429 and 5xx answers are retried with
exponential backoff; an attempt that received bytes resets the retry budget,
so a long download over a flaky link keeps going as long as it makes progress.
Every other failure is a :class:`~engine.store.errors.StoreError` with its
reason (``not_found``, ``http``, ``network``, ``digest_mismatch``,
``disk_full``, ``permission``, ``io``).

Within one process, concurrent fetches of one key share one download task; it
is cancelled only when every caller waiting on it has been cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import msgspec

from engine.store.errors import StoreError, os_error
from engine.store.netpolicy import (
    AddressPolicy,
    DestinationRefused,
    SchemeRefused,
    guarded_transport,
)
from engine.store.partial import (
    PartialState,
    Sidecar,
    append_partial,
    fsync_path,
    hash_prefix,
    lock_file,
    read_sidecar,
    write_sidecar,
)
from engine.store.urls import redact_url

__all__ = ["USER_AGENT", "Download", "Downloader", "Progress", "ProgressFn"]

USER_AGENT = "ferrousforge/0.1"

_PROGRESS_INTERVAL = 0.1  # at most ~10 progress reports per second
_MAX_RETRY_AFTER = 60.0
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Progress(msgspec.Struct, frozen=True):
    """A progress report: ``status`` is "downloading" or "verifying"."""

    status: str
    total: int | None  # bytes, None when unknown
    completed: int  # bytes on disk so far (including a resumed prefix)


ProgressFn = Callable[[Progress], None]


class Download(msgspec.Struct, frozen=True):
    """A complete, verified file inside ``partial_dir``; the caller moves it away or deletes it."""

    path: Path
    sha256: str
    size: int
    resumed_from: int  # bytes already on disk when the call started (0 = fresh)


class _Retry(Exception):
    """An attempt failed in a way a later attempt may not: ``error`` is raised once retries run out."""

    def __init__(self, error: StoreError, *, delay: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.delay = delay


class _Job:
    """One download in flight in this process, and the callers waiting on it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Download] | None = None
        self.listeners: list[ProgressFn] = []
        self.waiters = 0
        self.limit = 0  # bytes this download may write; 0 = no limit
        self.expect_start: bytes | None = None  # the resource's first bytes (a magic)
        self._last_report = 0.0

    def report(self, progress: Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < _PROGRESS_INTERVAL:
            return
        self._last_report = now
        for listener in list(self.listeners):
            listener(progress)


class Downloader:
    """Fetches URLs into ``partial_dir``, resuming and verifying; see the module docstring."""

    def __init__(
        self,
        partial_dir: Path,
        *,
        retries: int = 5,
        backoff: float = 0.2,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        chunk_size: int = 1 << 20,
        policy: AddressPolicy | None = None,
        max_bytes: int = 0,
        partial_quota: int = 0,
        partial_max_age: float = 0.0,
    ) -> None:
        """``policy``: where connections may go (None: anywhere, for the local CLI).
        ``max_bytes``: the largest file one download may write (0: no cap).
        ``partial_quota``: bytes all partial downloads together may hold (0: no cap).
        ``partial_max_age``: seconds after which an untouched partial is removed (0: kept).
        """
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.partial_dir = Path(partial_dir)
        self._retries = retries
        self._backoff = backoff
        self._timeout = timeout
        self._headers = dict(headers or {})
        self._chunk_size = chunk_size
        self._policy = policy
        self._max_bytes = max_bytes
        self._partial_quota = partial_quota
        self._partial_max_age = partial_max_age
        self._jobs: dict[str, _Job] = {}

    # -- public -------------------------------------------------------------------

    async def fetch(
        self,
        url: str,
        *,
        expected_sha256: str | None = None,
        headers: Mapping[str, str] | None = None,
        progress: ProgressFn | None = None,
        expect_start: bytes | None = None,
    ) -> Download:
        """Download ``url`` (or finish an earlier partial of it) and return the verified file.

        ``expect_start``: the bytes the resource must begin with (a format's
        magic, such as ``b"GGUF"``); anything else (an HTML page, an error
        document) is refused as soon as its first bytes arrive, not after it
        was downloaded whole, and nothing of it is kept.
        """
        expected: str | None = None
        if expected_sha256 is not None:
            expected = expected_sha256.strip().lower().removeprefix("sha256:")
            if not _HEX64.match(expected):
                raise StoreError("invalid", f"not a sha256 hex digest: {expected_sha256!r}")
        key = expected or hashlib.sha256(url.encode()).hexdigest()

        job = self._jobs.get(key)
        if job is None or job.task is None or job.task.done() or job.task.cancelling():
            job = _Job()
            job.expect_start = expect_start
            task = asyncio.create_task(self._run(key, url, expected, dict(headers or {}), job))
            job.task = task
            self._jobs[key] = job
            task.add_done_callback(functools.partial(self._job_done, key, job))
        assert job.task is not None
        if progress is not None:
            job.listeners.append(progress)
        job.waiters += 1
        try:
            return await asyncio.shield(job.task)
        except asyncio.CancelledError:
            if job.waiters == 1 and not job.task.done():
                job.task.cancel()  # nobody else waits for it
            raise
        finally:
            job.waiters -= 1
            if progress is not None:
                with contextlib.suppress(ValueError):
                    job.listeners.remove(progress)

    # -- in-process sharing -------------------------------------------------------

    def _job_done(self, key: str, job: _Job, task: asyncio.Task[Download]) -> None:
        if self._jobs.get(key) is job:
            del self._jobs[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter went away

    # -- one download, under the cross-process lock -------------------------------

    async def _run(
        self, key: str, url: str, expected: str | None, headers: dict[str, str], job: _Job
    ) -> Download:
        doing = f"downloading {redact_url(url)}"
        try:
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, doing) from exc
        job.limit = await asyncio.to_thread(self._room_for, key)
        lock_path = self.partial_dir / f"{key}.lock"
        fd = await lock_file(lock_path, doing)
        try:
            return await self._download(key, url, expected, headers, job)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)  # before unlocking: a waiter on this inode retries
            os.close(fd)

    async def _download(
        self, key: str, url: str, expected: str | None, headers: dict[str, str], job: _Job
    ) -> Download:
        doing = f"downloading {redact_url(url)}"
        partial = self.partial_dir / f"{key}.partial"
        meta_path = self.partial_dir / f"{key}.json"
        st = PartialState(partial, meta_path, read_sidecar(meta_path))
        try:
            size = partial.stat().st_size if partial.exists() else 0
            if size:
                st.hasher, st.size = await asyncio.to_thread(hash_prefix, partial, size)
            elif st.meta is not None and not partial.exists():
                meta_path.unlink(missing_ok=True)  # left by a finished download moved away
                st.meta = None
                st.total = None
        except OSError as exc:
            raise os_error(exc, doing) from exc
        resumed_from = st.size

        if expected is not None and st.size and st.hasher.hexdigest() == expected:
            # another process (or an earlier call) finished it: nothing to fetch
            total = st.total if st.total is not None else st.size
            job.report(Progress("verifying", total, st.size), force=True)
            await fsync_path(partial, doing)
            return Download(partial, expected, st.size, resumed_from)
        if st.total is not None and st.size > st.total:
            self._restart(st, doing)

        failures = 0
        timeout = httpx.Timeout(self._timeout)
        transport = None
        if self._policy is not None:
            # A redirect may never downgrade https to http (the policy may narrow further).
            first = httpx.URL(url).scheme
            transport = guarded_transport(self._policy, {"https", first})
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=True, max_redirects=10, transport=transport
        ) as client:
            while True:
                before = st.size
                try:
                    if await self._attempt(client, st, url, expected, headers, job):
                        break
                except _Retry as retry:
                    failures = 1 if st.size > before else failures + 1
                    if failures > self._retries:
                        err = retry.error
                        raise StoreError(
                            err.reason,
                            f"{err.message} (gave up after {self._retries} retries; "
                            f"{st.size} bytes kept: pull again to resume)",
                            retryable=True,
                        ) from retry
                    delay = self._backoff * 2 ** (failures - 1)
                    await asyncio.sleep(retry.delay if retry.delay is not None else delay)

        job.report(Progress("downloading", st.total, st.size), force=True)
        job.report(Progress("verifying", st.total, st.size), force=True)
        await fsync_path(partial, doing)
        digest = st.hasher.hexdigest()
        if expected is not None and digest != expected:
            try:
                partial.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
            except OSError as exc:
                raise os_error(exc, doing) from exc
            raise StoreError(
                "digest_mismatch",
                f"{redact_url(url)}: expected sha256 {expected} but the {st.size} bytes received have "
                f"sha256 {digest}; the download was discarded",
            )
        return Download(partial, digest, st.size, resumed_from)

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        st: PartialState,
        url: str,
        expected: str | None,
        headers: dict[str, str],
        job: _Job,
    ) -> bool:
        """One GET; True when the partial is complete, False to ask again right away."""
        doing = f"downloading {redact_url(url)}"
        req = httpx.Headers({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        req.update(self._headers)
        req.update(headers)
        if st.size:
            meta = st.meta
            validator = None
            if meta is not None and meta.url == url:
                validator = meta.etag or meta.last_modified
            if validator is None and expected is None:
                self._restart(st, doing)  # nothing would notice a changed resource
            else:
                req["Range"] = f"bytes={st.size}-"
                if validator is not None:
                    req["If-Range"] = validator
        try:
            async with client.stream("GET", url, headers=req) as resp:
                return await self._consume(resp, st, url, job)
        except SchemeRefused as exc:
            raise StoreError(
                "forbidden", f"{doing}: a redirect leads to {exc}://, which is not allowed"
            ) from None
        except DestinationRefused:
            # The same words whatever the address, port or hop: no map of the network.
            raise StoreError(
                "forbidden",
                f"{doing}: the source or a redirect leads to a loopback, private or "
                "link-local address, which pulls may not reach ([sources] allow_hosts)",
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise StoreError("invalid", f"cannot download {redact_url(url)}: {exc}") from exc
        except httpx.TooManyRedirects as exc:
            raise StoreError("http", f"{doing}: too many redirects") from exc
        except httpx.RequestError as exc:
            if _unresolved(exc):
                # A host name that does not resolve will not resolve in a second either.
                raise StoreError(
                    "network",
                    f"{doing}: the host name does not resolve (check the URL or the network)",
                ) from exc
            raise _Retry(StoreError("network", f"{doing}: {_describe(exc)}")) from exc

    async def _consume(self, resp: httpx.Response, st: PartialState, url: str, job: _Job) -> bool:
        doing = f"downloading {redact_url(url)}"
        status = resp.status_code
        what = f"HTTP {status} {resp.reason_phrase}".strip()
        if status == 416:
            m = _UNSATISFIED_RANGE.match(resp.headers.get("content-range", ""))
            total = int(m[1]) if m else st.total
            if st.size and total is not None and st.size == total:
                st.total = total
                return True
            if st.restarted_416:
                raise StoreError("http", f"{doing}: {what} even for the whole file")
            st.restarted_416 = True
            self._restart(st, doing)
            return False
        if status in (404, 410):
            raise StoreError("not_found", f"{redact_url(url)} was not found ({what})")
        if status in (401, 403):
            raise StoreError(
                "http",
                f"{doing}: {what}; the source needs credentials or forbids access "
                "(set a token for it or check the URL)",
            )
        if status == 429 or status >= 500:
            raise _Retry(
                StoreError("http", f"{doing}: {what}", retryable=True),
                delay=_retry_after(resp.headers.get("retry-after")),
            )
        if status not in (200, 206):
            raise StoreError("http", f"{doing}: unexpected {what}")

        encoded = resp.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            total = int(m[3]) if m is not None and m[3] != "*" else None
            known = st.meta.total if st.meta is not None else None
            if (
                m is None
                or int(m[1]) != st.size
                or (total is not None and known is not None and total != known)
            ):
                self._restart(st, doing)  # not the continuation we asked for
                return False
        else:
            if st.size:
                self._restart(st, doing)  # the server sends the whole resource again
            length = resp.headers.get("content-length", "")
            total = int(length) if length.isdigit() and not encoded else None
        st.total = total
        if job.limit and total is not None and total > job.limit:
            raise self._too_large(st, doing, job.limit)
        etag = resp.headers.get("etag")
        meta = Sidecar(
            url=url,
            etag=etag if etag and not etag.startswith("W/") else None,
            last_modified=resp.headers.get("last-modified"),
            total=total,
        )
        if meta != st.meta:
            write_sidecar(st.meta_path, meta, doing)
            st.meta = meta
        job.report(Progress("downloading", total, st.size), force=True)

        try:
            f = open(st.path, "ab", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            raise os_error(exc, doing) from exc
        with f:
            buf = bytearray()
            sniffing = job.expect_start if st.size == 0 else None
            try:
                async for piece in resp.aiter_bytes():
                    buf += piece
                    if sniffing is not None and len(buf) >= len(sniffing):
                        if not buf.startswith(sniffing):
                            buf.clear()
                            raise self._not_the_format(st, doing, sniffing)
                        sniffing = None
                    if job.limit and st.size + len(buf) > job.limit:
                        buf.clear()
                        raise self._too_large(st, doing, job.limit)
                    if len(buf) >= self._chunk_size:
                        append_partial(f, st, buf, doing)
                    job.report(Progress("downloading", total, st.size + len(buf)))
            except StoreError:
                raise
            except BaseException:
                append_partial(f, st, buf, doing)  # keep every byte that arrived
                raise
            append_partial(f, st, buf, doing)
        if total is not None and st.size != total:
            if st.size > total:
                self._restart(st, doing)
            raise _Retry(
                StoreError("network", f"{doing}: got {st.size} of {total} bytes", retryable=True)
            )
        return True

    def _not_the_format(self, st: PartialState, doing: str, magic: bytes) -> StoreError:
        """Drop the partial and its sidecar: the source serves something else."""
        self._restart(st, doing)
        with contextlib.suppress(OSError):
            st.meta_path.unlink(missing_ok=True)
        return StoreError(
            "source",
            f"{doing}: the source does not serve a model file (it does not begin with "
            f"{magic!r}; a web page instead of a download link?)",
        )

    def _too_large(self, st: PartialState, doing: str, limit: int) -> StoreError:
        """Drop the partial and its sidecar: a download over the cap is not resumed."""
        self._restart(st, doing)
        with contextlib.suppress(OSError):
            st.meta_path.unlink()
        return StoreError(
            "too_large",
            f"{doing}: the file exceeds the {limit}-byte limit of one pull on this server "
            "(the per-pull cap or what is left of the partial-download quota); "
            "nothing was kept",
        )

    def _room_for(self, key: str) -> int:
        """Remove stale partials; the bytes this download may write (0: no limit).

        The quota counts every other partial (finished ones are moved out of
        ``partial/`` at once), so interrupted downloads cannot fill the disk.
        """
        now = time.time()
        others = 0
        try:
            entries = list(os.scandir(self.partial_dir))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.name.endswith(".partial"):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            stem = entry.name.removesuffix(".partial")
            stale = self._partial_max_age and now - st.st_mtime > self._partial_max_age
            if stale and not (self.partial_dir / f"{stem}.lock").exists():  # not being written
                for suffix in (".partial", ".json"):
                    with contextlib.suppress(OSError):
                        (self.partial_dir / f"{stem}{suffix}").unlink()
                continue
            if stem != key:
                others += st.st_size
        limits = [x for x in (self._max_bytes,) if x]
        if self._partial_quota:
            room = self._partial_quota - others
            if room <= 0:
                raise StoreError(
                    "too_large",
                    "the server's space for unfinished downloads is full; "
                    "try again when other pulls have finished",
                    retryable=True,
                )
            limits.append(room)
        return min(limits) if limits else 0

    def _restart(self, st: PartialState, doing: str) -> None:
        """Forget the partial: the next bytes written are byte 0 of the resource."""
        try:
            st.path.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, doing) from exc
        st.size = 0
        st.hasher = hashlib.sha256()


# -- helpers ----------------------------------------------------------------------


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), _MAX_RETRY_AFTER)


def _describe(exc: Exception) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _unresolved(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed host name lookup."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return "Name or service not known" in text or "nodename nor servname" in text
