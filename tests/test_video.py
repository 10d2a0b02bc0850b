"""Video analysis on a real server: clips made here with PyAV (coloured frames, a spoken or
tone soundtrack), frames classified or embedded by real models, the soundtrack transcribed
by Whisper tiny.en, with timestamps; hostile videos are typed errors."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from engine.tinyvision import write_tiny_classifier, write_tiny_clip
from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # two seconds each
SENTENCE = "Green apples sit on the kitchen table."


def _clip(
    seconds: int = 6, *, audio: np.ndarray | None = None, rate: int = 16000, fps: int = 10
) -> bytes:
    """An mp4 (H.264 + AAC): the colour changes every two seconds; ``audio`` (float, mono)
    as its soundtrack when given."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        sound = None
        if audio is not None:
            sound = out.add_stream("aac", rate=rate)
            sound.layout = "mono"
        for i in range(seconds * fps):
            img = np.zeros((120, 160, 3), np.uint8)
            img[:] = COLOURS[(i // (2 * fps)) % 3]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is not None and audio is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            for k in range(0, len(pcm), 1024):
                chunk = av.AudioFrame.from_ndarray(
                    pcm[None, k : k + 1024], format="s16", layout="mono"
                )
                chunk.sample_rate, chunk.pts = rate, k
                for packet in sound.encode(chunk):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def spoken_clip() -> bytes:
    from hibari import Hibari

    tts = Hibari()
    speech = np.asarray(tts(SENTENCE), np.float32)
    audio = np.zeros(6 * tts.sample_rate, np.float32)
    start = int(1.0 * tts.sample_rate)
    audio[start : start + len(speech)] = speech[: len(audio) - start]
    return _clip(audio=audio, rate=tts.sample_rate)


@pytest.fixture
async def running(tmp_path: Path, whisper_tiny: Path) -> AsyncIterator[RunningServer]:
    models = {
        "colours": write_tiny_classifier(tmp_path / "colours"),
        "clip": tmp_path / "clip",
        "whisper": whisper_tiny,
    }
    write_tiny_clip(tmp_path / "clip")
    async with gateway(server_config(tmp_path / "home", models)) as srv:
        yield srv


def _client(srv: RunningServer, scopes: set[str] | None = None) -> httpx.AsyncClient:
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600, scopes=scopes)
    return httpx.AsyncClient(
        base_url=srv.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    )


async def _analyze(c: httpx.AsyncClient, video: bytes, **fields: Any) -> httpx.Response:
    data = {k: str(v) for k, v in fields.items()}
    return await c.post("/v1/video/analyze", files={"file": ("clip.mp4", video)}, data=data)


async def test_frames_are_classified_and_the_soundtrack_transcribed_with_timestamps(
    running: RunningServer, spoken_clip: bytes
) -> None:
    async with _client(running) as c:
        r = await _analyze(c, spoken_clip, model="colours", asr_model="whisper", top_k=1)
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["duration"] == pytest.approx(6.0, abs=0.2) and body["notices"] == []
    frames = body["frames"]
    assert [f["t"] for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5], abs=0.05)
    assert [f["labels"][0]["label"] for f in frames] == [
        "red",
        "red",
        "green",
        "green",
        "blue",
        "blue",
    ]
    words = re.findall(r"[a-z]+", body["transcript"]["text"].lower())
    # (A plural's "s", lost through two lossy audio codecs, is not what is tested here.)
    assert [w.rstrip("s") for w in words] == [
        w.rstrip("s") for w in re.findall(r"[a-z]+", SENTENCE.lower())
    ]
    segments = body["transcript"]["segments"]
    assert segments and 0.5 <= segments[0]["start"] <= 1.5 and segments[-1]["end"] <= 6.2


async def test_streamed_analysis_reports_progress_and_embeds_frames(running: RunningServer) -> None:
    """SSE: the job's id, a notice that the soundtrack needs a speech model, frames with their progress
    in order, ``done`` last; frames embedded by a CLIP model match their colour's caption."""
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(6 * 16000) / 16000)
    video = _clip(audio=tone.astype(np.float32))
    events: list[tuple[str, dict[str, Any]]] = []
    async with _client(running) as c:
        fields = {"model": "clip", "task": "embed", "every": "2", "stream": "true"}
        async with c.stream(
            "POST", "/v1/video/analyze", files={"file": ("c.mp4", video)}, data=fields
        ) as r:
            assert r.status_code == 200
            name = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        captions = await c.post(
            "/v1/embeddings",
            json={"model": "clip", "input": [f"a {n} square" for n in ("red", "green", "blue")]},
        )
    assert events[0][0] == "job"  # the job that keeps running if the client goes
    events = events[1:]
    names = [n for n, _ in events]
    assert names[0] == "notice" and "asr_model" in events[0][1]["message"]
    assert names[-1] == "done" and events[-1][1]["frames"] == 3
    frames = [d for n, d in events if n == "frame"]
    assert [f["t"] for f in frames] == pytest.approx([0, 2, 4], abs=0.05)
    progress = [d["done"] for n, d in events if n == "progress" and d["stage"] == "frames"]
    assert progress == sorted(progress) and progress[-1] == 3
    text = np.array([d["embedding"] for d in captions.json()["data"]])
    similarity = np.array([f["embedding"] for f in frames]) @ text.T
    assert list(similarity.argmax(axis=1)) == [0, 1, 2]


def _four_hours() -> bytes:
    """Two frames four hours apart: a tiny file whose header says 4 h."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=1)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        for pts in (0, 4 * 3600):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = pts
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
    return buf.getvalue()


async def test_hostile_videos_are_typed_errors_and_the_next_request_works(
    running: RunningServer, spoken_clip: bytes
) -> None:
    good = _clip(seconds=2)
    wav = io.BytesIO()
    with av.open(wav, mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    async with _client(running) as c:
        for video, fields, status, why in (
            (_four_hours(), {"model": "colours"}, 413, "at most 1800"),
            (good[: len(good) // 3], {"model": "colours"}, 400, "could not"),
            (b"this is not a video at all", {"model": "colours"}, 400, "could not be read"),
            (wav.getvalue(), {"model": "colours"}, 400, "no video stream"),
            (good, {}, 400, "image model"),
            (good, {"model": "colours", "every": "0.01"}, 400, "at least 0.1"),
            (good, {"model": "colours", "task": "draw"}, 400, "classify or embed"),
            (good, {"model": "whisper"}, 400, "does not classify"),
            (good, {"model": "nope"}, 404, "nope"),
        ):
            r = await _analyze(c, video, **fields)
            assert r.status_code == status, (fields, r.text)
            assert re.search(why, r.json()["error"]["message"]), r.text
        r = await c.post("/v1/video/analyze", json={"model": "colours"})
        assert r.status_code == 400 and "multipart" in r.text
        r = await _analyze(c, good, model="colours")
        assert r.status_code == 200 and len(r.json()["frames"]) == 2


# -- jobs that outlive their request ----------------------------------------------------


def _events(text: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
    return out


async def test_a_streamed_analysis_survives_its_client_and_is_followed_again(
    running: RunningServer,
) -> None:
    """The client of a streamed analysis leaves after its first frame; the job goes on, and
    GET with Last-Event-ID gives every later event once, in order, to ``done``; another user
    sees no such job; a detached job is followed over the WebSocket (``watch``, from
    ``after``), and a WebSocket cancel stops one."""
    from protocol import messages as m

    from .gateway_helpers import client

    video = _clip(seconds=6)
    async with _client(running) as c:
        fields = {"model": "colours", "every": "0.5", "stream": "true"}
        seen: list[tuple[str | None, str, dict[str, Any]]] = []
        async with c.stream(
            "POST", "/v1/video/analyze", files={"file": ("c.mp4", video)}, data=fields
        ) as r:
            assert r.status_code == 200
            job_url = r.headers["location"]
            buffer = ""
            async for chunk in r.aiter_text():
                buffer += chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    seen += _events(block)
                if any(name == "frame" for _, name, _ in seen):
                    break  # the client goes away
        assert seen[0][1] == "job" and job_url == f"/v1/video/jobs/{seen[0][2]['id']}"
        last = max(int(i) for i, _, _ in seen if i)
        r = await c.get(job_url, headers={"Last-Event-ID": str(last)})
        assert r.status_code == 200
        rest = _events(r.text)
        assert [int(i or 0) for i, _, _ in rest] == list(range(last + 1, last + 1 + len(rest)))
        assert rest[-1][1] == "done" and rest[-1][2]["frames"] == 12
        frames = [d for _, n, d in seen + rest if n == "frame"]
        assert [f["t"] for f in frames] == pytest.approx([k / 2 for k in range(12)], abs=0.06)

        other = running.gateway.auth.issue_token(sub="mallory", ttl=600)
        r = await c.get(job_url, headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404
        r = await c.delete(job_url, headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404

        r = await _analyze(c, video, model="colours", every="1", detach="true")
        assert r.status_code == 202
        job = r.json()["id"]

    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    async with client(running, token, subprotocol=m.SUBPROTOCOL_MSGPACK) as ws:
        await ws.send(m.Watch(id="w1", job=job))
        got: list[m.ServerMessage] = []
        while not isinstance(msg := await ws.recv(), m.Done):
            got.append(msg)
        assert msg.finish_reason == "stop" and isinstance(got[0], m.Started)
        events = [x for x in got if isinstance(x, m.VideoEvent)]
        assert [e.t for e in events] == pytest.approx([0, 1, 2, 3, 4, 5], abs=0.06)
        assert [e.labels[0].label for e in events if e.labels] == [
            "red",
            "red",
            "green",
            "green",
            "blue",
            "blue",
        ]
        assert any(isinstance(x, m.Progress) and x.status == "frames" for x in got)
        # From the middle: only what came after.
        await ws.send(m.Watch(id="w2", job=job, after=events[2].seq))
        again = []
        while not isinstance(msg := await ws.recv(), m.Done):
            if isinstance(msg, m.VideoEvent):
                again.append(msg.seq)
        assert again == [e.seq for e in events[3:]]
        await ws.send(m.Watch(id="w3", job="job_nope"))
        msg = await ws.recv()
        assert isinstance(msg, m.Error) and msg.id == "w3" and msg.code == "not_found"

        async with _client(running) as c:
            long = _clip(seconds=20)
            r = await _analyze(c, long, model="colours", every="0.1", detach="true")
            job = r.json()["id"]
            await ws.send(m.Watch(id="w4", job=job))
            while not isinstance(msg := await ws.recv(), m.VideoEvent):
                pass
            await ws.send(m.Cancel(id="w4"))
            while not isinstance(msg := await ws.recv(), m.Done):
                pass
            assert msg.finish_reason == "cancelled"
            r = await c.get(f"/v1/video/jobs/{job}")
            tail = _events(r.text)
            assert tail[-1][1] == "error" and tail[-1][2]["code"] == "cancelled"
            assert sum(1 for _, n, _ in tail if n == "frame") < 200


async def test_running_video_jobs_per_user_are_bounded(running: RunningServer) -> None:
    long = _clip(seconds=20)
    async with _client(running) as c:
        ids = []
        for _ in range(2):
            r = await _analyze(c, long, model="colours", every="0.1", detach="true")
            assert r.status_code == 202
            ids.append(r.json()["id"])
        r = await _analyze(c, long, model="colours", every="0.1", detach="true")
        assert r.status_code == 429 and "at most 2" in r.json()["error"]["message"]
        assert "retry-after" in r.headers
        for job in ids:
            assert (await c.delete(f"/v1/video/jobs/{job}")).status_code == 204
        for job in ids:
            r = await c.get(f"/v1/video/jobs/{job}")
            assert _events(r.text)[-1][2]["code"] == "cancelled"
        r = await _analyze(c, _clip(seconds=2), model="colours", detach="true")
        assert r.status_code == 202


async def test_a_video_is_fetched_from_a_url_as_pulls_are(tmp_path: Path) -> None:
    """``url`` instead of a file: only for callers who may have the server fetch
    (``models:write``), only by an allowed scheme, to an address pulls may reach
    (loopback only when listed in ``video_allow_hosts``: the pulls' ``allow_hosts``
    does not open it), within the size cap; an operator may turn urls off."""
    from gateway.config import SourcesConfig

    from .fileserver import serve_payload

    video = _clip(seconds=2)
    colours = write_tiny_classifier(tmp_path / "colours")
    writer = {"generate", "models:write"}
    with serve_payload(video, "/clip.mp4") as source:
        default = server_config(tmp_path / "a", {"colours": colours})
        async with gateway(default) as srv, _client(srv, writer) as c, _client(srv) as user:
            r = await user.post("/v1/video/analyze", data={"model": "colours", "url": source.url})
            assert r.status_code == 403 and "models:write" in r.json()["error"]["message"]
            r = await c.post("/v1/video/analyze", data={"model": "colours", "url": source.url})
            assert r.status_code == 400 and "https://" in r.json()["error"]["message"]
            https = source.url.replace("http://", "https://")
            r = await c.post("/v1/video/analyze", data={"model": "colours", "url": "ftp://x/y"})
            assert r.status_code == 400
            r = await c.post(
                "/v1/video/analyze",
                data={"model": "colours", "url": https},
                files={"file": ("c.mp4", video)},
            )
            assert r.status_code == 400 and "a file field named 'file', or a url" in r.text

        pulls_only = SourcesConfig(schemes=["https", "http"], allow_hosts=["127.0.0.1"])
        config = server_config(tmp_path / "b", {"colours": colours}, sources=pulls_only)
        async with gateway(config) as srv, _client(srv, writer) as c:
            r = await c.post("/v1/video/analyze", data={"model": "colours", "url": source.url})
            assert r.status_code == 403 and "allow_hosts" in r.json()["error"]["message"]

        allowed = SourcesConfig(schemes=["https", "http"], video_allow_hosts=["127.0.0.1"])
        config = server_config(tmp_path / "c", {"colours": colours}, sources=allowed)
        async with gateway(config) as srv, _client(srv, writer) as c:
            r = await c.post("/v1/video/analyze", data={"model": "colours", "url": source.url})
            assert r.status_code == 200, r.text
            assert [f["labels"][0]["label"] for f in r.json()["frames"]] == ["red", "red"]
            assert not any((srv.gateway.models.home / "tmp").iterdir())  # nothing kept

        off = SourcesConfig(
            schemes=["https", "http"], video_allow_hosts=["127.0.0.1"], video_urls=False
        )
        config = server_config(tmp_path / "d", {"colours": colours}, sources=off)
        async with gateway(config) as srv, _client(srv, writer) as c:
            r = await c.post("/v1/video/analyze", data={"model": "colours", "url": source.url})
            assert r.status_code == 403 and "send the file" in r.json()["error"]["message"]


async def test_running_jobs_are_bounded_for_everyone(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import joblog

    monkeypatch.setattr(joblog, "MAX_RUNNING", 1)  # everyone's jobs at once
    long = _clip(seconds=20)
    async with _client(running) as c:
        r = await _analyze(c, long, model="colours", every="0.1", detach="true")
        assert r.status_code == 202
        other = running.gateway.auth.issue_token(sub="bob", ttl=600)
        r2 = await c.post(
            "/v1/video/analyze",
            files={"file": ("c.mp4", long)},
            data={"model": "colours", "detach": "true"},
            headers={"Authorization": f"Bearer {other}"},
        )
        assert r2.status_code == 503 and r2.headers.get("retry-after")
        assert r2.json()["error"]["code"] == "overloaded"
        # A plain (answered-when-done) analysis takes a place like the others.
        r3 = await c.post(
            "/v1/video/analyze",
            files={"file": ("c.mp4", long)},
            data={"model": "colours"},
            headers={"Authorization": f"Bearer {other}"},
        )
        assert r3.status_code == 503 and r3.json()["error"]["code"] == "overloaded"
        r4 = await c.get(f"/v1/video/jobs/{r.json()['id']}", params={"after": "²"})
        assert r4.status_code == 400
        assert (await c.delete(f"/v1/video/jobs/{r.json()['id']}")).status_code == 204


async def test_image_and_video_routes_refuse_callers_without_the_right(
    running: RunningServer,
) -> None:
    """No credential: 401 on the native routes; a credential that may only read models
    (no ``generate``): 403 where a model would run. Browsers from other origins are refused
    for every route by the same guard as the rest (tests/test_security.py)."""
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/classify", {"json": {"model": "colours", "images": [png]}}),
        ("POST", "/v1/images/generations", {"json": {"model": "colours", "prompt": "x"}}),
        ("POST", "/v1/embeddings", {"json": {"model": "clip", "input": [], "images": [png]}}),
        (
            "POST",
            "/v1/video/analyze",
            {"files": {"file": ("c.mp4", _clip(seconds=1))}, "data": {"model": "colours"}},
        ),
    ]
    reader = running.gateway.auth.issue_token(sub="alice", ttl=600, scopes={"models:read"})
    async with httpx.AsyncClient(base_url=running.http_url, timeout=60) as c:
        native = [calls[0], calls[3]]  # (OpenAI routes let loopback clients in, as configured)
        for method, path, kw in [
            *native,
            ("GET", "/v1/video/jobs/job_x", {}),
            ("DELETE", "/v1/video/jobs/job_x", {}),
        ]:
            r = await c.request(method, path, **kw)
            assert r.status_code == 401, (path, r.status_code)
        for method, path, kw in calls:
            r = await c.request(method, path, headers={"Authorization": f"Bearer {reader}"}, **kw)
            assert r.status_code == 403, (path, r.status_code, r.text)


def test_a_stopped_reading_ends_at_the_next_frame() -> None:
    """An analysis that is cancelled sets the stop flag: its decoding thread is given back
    within one frame instead of reading the rest of the video."""
    import threading

    from engine.video import sample_frames

    stop = threading.Event()
    frames = sample_frames(_clip(seconds=6), every=0.1, max_seconds=60, stop=stop)
    t0, _ = next(frames)
    assert t0 == 0.0
    stop.set()
    assert list(frames) == []


async def test_finished_jobs_are_kept_within_caps_and_faults_end_a_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One user's finished jobs never fill the registry for another; a job whose work
    fails unexpectedly ends with an ``internal`` error its followers see."""
    from gateway import joblog
    from gateway.auth import Principal

    monkeypatch.setattr(joblog, "MAX_JOBS", 20)
    jobs = joblog.JobLogs(keep=3600)
    alice = Principal("alice", None, "jwt", None)
    bob = Principal("bob", None, "jwt", None)

    async def quick(job: joblog.JobLog) -> None:
        job.add("done", {})

    started = []
    for _ in range(joblog.MAX_KEPT_PER_USER + 5):
        job = jobs.start(jobs.reserve(alice), quick)
        await job.task  # type: ignore[misc]
        started.append(job.id)
    kept = [j for j in started if j in jobs._jobs]
    assert kept == started[-joblog.MAX_KEPT_PER_USER :]
    for _ in range(8):
        job = jobs.start(jobs.reserve(bob), quick)
        await job.task  # type: ignore[misc]
    assert len(jobs._jobs) <= 20 and job.id in jobs._jobs

    async def broken(job: joblog.JobLog) -> None:
        raise ValueError("a bug")

    job = jobs.start(jobs.reserve(bob), broken)
    await job.task  # type: ignore[misc]
    assert [n for n, _ in job.events] == ["error"] and job.events[0][1]["code"] == "internal"
    # A ticket not used gives its place back.
    tickets = [jobs.reserve(bob) for _ in range(joblog.MAX_RUNNING_PER_USER)]
    with pytest.raises(joblog.RateLimited):
        jobs.reserve(bob)
    tickets[0].release()
    tickets[0].release()
    jobs.reserve(bob).release()
    await jobs.close()
