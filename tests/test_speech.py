"""Speech: Whisper tiny.en and the hibari voice (both from PyPI wheels) through the engine
and the OpenAI routes.

Speech is synthesised by the hibari voice from known sentences, so every
check is on real speech and real models: the words come back, segments
stream before the whole transcript and never change after, speech comes
sentence by sentence and round-trips through the recogniser in every audio
format, the official openai client's calls work, and bad requests get typed
errors without disturbing the next one.
"""

from __future__ import annotations

import asyncio
import io
import re
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from engine import (
    EngineClient,
    EngineConfig,
    GenerateRequest,
    SamplingParams,
    Speech,
    SpeechChunk,
    SpeechOptions,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
)
from engine.backends import Kind, find_entry
from engine.jobcalls import MAX_AUDIO_BYTES
from engine.modelfacts import kind_of
from engine.store.errors import StoreError
from engine.store.pull import ModelManager
from engine.store.sources import BUILTIN_CATALOG, CatalogEntry
from engine.store.store import ModelStore
from gateway.audio_routes import srt, vtt
from gateway.config import AuthConfig
from gateway.server import RunningServer
from protocol.errors import BadRequest

from .gateway_helpers import gateway, server_config

FOX = "The quick brown fox jumps over the lazy dog."
APPLES = "Green apples sit on the kitchen table."


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _wav(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="session")
def speech() -> bytes:
    """Two sentences of synthesised speech, 24 kHz 16-bit WAV (resampled by the server)."""
    from hibari import Hibari

    tts = Hibari()
    pause = np.zeros(int(0.6 * tts.sample_rate), dtype=np.float32)
    audio = np.concatenate([tts(FOX), pause, tts(APPLES)])
    return _wav(audio, tts.sample_rate)


# -- the engine ----------------------------------------------------------------------


def test_the_registry_takes_speech_models_by_their_layout(whisper_tiny: Path, voice: Path) -> None:
    entry = find_entry(str(whisper_tiny))
    assert entry.name == "whisper" and entry.inspect(str(whisper_tiny)).kinds == {Kind.ASR}
    entry = find_entry(str(voice))
    assert entry.name == "hibari" and entry.inspect(str(voice)).kinds == {Kind.TTS}


async def test_speech_comes_sentence_by_sentence_and_bad_requests_are_refused(
    voice: Path, whisper_tiny: Path
) -> None:
    """Three sentences come as three pieces of PCM before the end, which counts their
    length; a seed gives the same audio again; bad inputs are typed errors at once."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as engine:
        await engine.load("voice", voice)
        await engine.load("asr", whisper_tiny)
        text = "One small step. Another small step. The last step."
        parts: list[bytes] = []
        end = None
        async for item in engine.synthesize_stream("voice", text, SpeechOptions(seed=7)):
            if isinstance(item, Speech):
                end = item
            else:
                assert end is None and item.rate == 24000
                parts.append(item.pcm)
        assert end is not None and len(parts) == 3 and all(parts)
        assert end.sample_rate == 24000
        assert end.seconds == pytest.approx(sum(map(len, parts)) / 2 / 24000)
        again = [x async for x in engine.synthesize_stream("voice", text, SpeechOptions(seed=7))]
        assert [x.pcm for x in again[:-1] if isinstance(x, SpeechChunk)] == parts
        for bad, options, why in (
            ("", SpeechOptions(), "empty"),
            ("hi", SpeechOptions(speed=3.0), "speed"),
        ):
            with pytest.raises(BadRequest, match=why):
                async for _ in engine.synthesize_stream("voice", bad, options):
                    pass
        with pytest.raises(BadRequest, match="does not synthesise"):
            async for _ in engine.synthesize_stream("asr", text):
                pass


async def test_synthesised_speech_comes_back_as_its_words_segment_by_segment(
    whisper_tiny: Path, speech: bytes, script_model: Path
) -> None:
    """Segments stream before the whole transcript, which is exactly their text; word
    timings rise; a text model beside it is refused transcription, and the speech model
    generation, each with a clear error."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as engine:
        await engine.load("asr", whisper_tiny)
        await engine.load("text", script_model)
        seen: list[TranscriptSegment | Transcript] = []
        async for item in engine.transcribe_stream(
            "asr", speech, TranscribeOptions(word_timestamps=True)
        ):
            seen.append(item)
        *segments, result = seen
        assert isinstance(result, Transcript) and segments
        assert all(isinstance(s, TranscriptSegment) for s in segments)
        assert result.segments == segments
        assert result.text == "".join(s.text for s in result.segments).strip()
        assert _words(result.text) == _words(FOX + " " + APPLES)
        assert result.language == "en" and 5.0 < result.duration < 12.0
        starts = [w.start for s in result.segments for w in s.words or ()]
        assert len(starts) == len(_words(result.text)) and starts == sorted(starts)

        with pytest.raises(BadRequest, match="does not transcribe"):
            await engine.transcribe("text", speech)
        request = GenerateRequest(model="asr", prompt="hi", sampling=SamplingParams(max_tokens=2))
        with pytest.raises(BadRequest, match="speech recognition model"):
            async for _ in engine.generate(request):
                pass
        with pytest.raises(BadRequest, match="English-only"):
            await engine.transcribe("asr", speech, TranscribeOptions(task="translate"))


async def test_bad_audio_is_refused_and_an_abandoned_job_stops(
    whisper_tiny: Path, speech: bytes
) -> None:
    """Non-audio, a truncated file and an empty upload are bad requests; a transcription
    whose caller stops reading is dropped in the worker, which then serves the next one."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as engine:
        await engine.load("asr", whisper_tiny)
        for bad, why in (
            (b"not audio at all" * 64, "could not be decoded"),
            (speech[:40], "no samples|could not be decoded"),
            (b"", "empty"),
        ):
            with pytest.raises(BadRequest, match=why):
                await engine.transcribe("asr", bad)
        # A longer file (several windows of work), abandoned after its first segment.
        events = engine.transcribe_stream("asr", _repeated(speech, 4))
        first = await anext(events)
        assert isinstance(first, TranscriptSegment)
        await events.aclose()  # the caller went away
        again = await engine.transcribe("asr", speech)
        assert _words(again.text) == _words(FOX + " " + APPLES)
        health = await engine.health()
        assert health.ok and health.restarts == 0


def _repeated(wav: bytes, times: int) -> bytes:
    """``times`` copies of one WAV's audio in one WAV."""
    with wave.open(io.BytesIO(wav)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32767
    return _wav(np.tile(audio, times), rate)


# -- the OpenAI routes -----------------------------------------------------------------


@pytest.fixture
async def running(
    tmp_path: Path, whisper_tiny: Path, voice: Path, script_model: Path
) -> AsyncIterator[RunningServer]:
    models = {"whisper": whisper_tiny, "voice": voice, "script": script_model}
    # A shared server: every request needs a credential, loopback ones too.
    config = server_config(tmp_path, models, auth=AuthConfig(loopback_without_token=False))
    async with gateway(config) as srv:
        yield srv


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    c = openai.AsyncOpenAI(
        base_url=running.http_url + "/v1", api_key=token, max_retries=0, timeout=60
    )
    try:
        yield c
    finally:
        await c.close()


async def test_the_official_client_transcribes_in_every_format(
    client: openai.AsyncOpenAI, speech: bytes
) -> None:
    upload = ("speech.wav", speech, "audio/wav")
    plain = await client.audio.transcriptions.create(model="whisper", file=upload)
    assert _words(plain.text) == _words(FOX + " " + APPLES)

    verbose = await client.audio.transcriptions.create(
        model="whisper",
        file=upload,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.text == plain.text and verbose.language == "en"
    assert verbose.segments and verbose.segments[0].start == 0.0
    assert _words(" ".join(w.word for w in verbose.words or [])) == _words(plain.text)

    text = await client.audio.transcriptions.create(
        model="whisper", file=upload, response_format="text"
    )
    assert str(text).strip() == plain.text
    subtitles = await client.audio.transcriptions.create(
        model="whisper", file=upload, response_format="srt"
    )
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:\d\d,\d{3}\n\S", str(subtitles))
    web = await client.audio.transcriptions.create(
        model="whisper", file=upload, response_format="vtt"
    )
    assert str(web).startswith("WEBVTT\n\n00:00:00.")

    deltas, done = [], None
    stream = await client.audio.transcriptions.create(model="whisper", file=upload, stream=True)
    async for event in stream:
        if event.type == "transcript.text.delta":
            assert done is None  # deltas come before the end, never after
            deltas.append(event.delta)
        else:
            done = event.text
    assert deltas and done == "".join(deltas).strip() == plain.text


async def test_bad_uploads_get_typed_errors_and_the_next_request_works(
    running: RunningServer, client: openai.AsyncOpenAI, speech: bytes
) -> None:
    upload = ("speech.wav", speech, "audio/wav")
    cases = [
        (
            {"model": "whisper", "file": ("x.wav", b"\x00garbage" * 100, "audio/wav")},
            400,
            "decoded",
        ),
        ({"model": "script", "file": upload}, 400, "does not transcribe"),
        ({"model": "nope", "file": upload}, 404, "nope"),
        ({"model": "whisper", "file": upload, "temperature": 3}, 400, "temperature"),
        ({"model": "whisper", "file": upload, "response_format": "xml"}, 400, "response_format"),
    ]
    for kwargs, status, said in cases:
        with pytest.raises(openai.APIStatusError) as err:
            await client.audio.transcriptions.create(**kwargs)  # type: ignore[call-overload]
        assert err.value.status_code == status and said in str(err.value), err.value

    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=running.http_url, timeout=60) as http:
        # Not a form; no file; an upload announced past the limit (refused before it is read).
        r = await http.post("/v1/audio/transcriptions", headers=headers, json={"model": "whisper"})
        assert r.status_code == 400 and "multipart" in r.text
        r = await http.post(
            "/v1/audio/transcriptions",
            headers=headers,
            data={"model": "whisper"},
            files={"audio": upload},  # a form, but its file is not named 'file'
        )
        assert r.status_code == 400 and "field named 'file'" in r.text
        reader, writer = await asyncio.open_connection(running.host, running.port)
        writer.write(
            (
                "POST /v1/audio/transcriptions HTTP/1.1\r\n"
                f"Host: {running.host}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\n"
                f"Content-Length: {MAX_AUDIO_BYTES * 2}\r\n\r\n--x\r\n"
            ).encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 30)
        assert status.split()[1] == b"413", status
        writer.close()
        r = await http.post(
            "/v1/audio/translations",
            headers=headers,
            files={"file": upload},
            data={"model": "whisper"},
        )
        assert r.status_code == 400 and "English-only" in r.text
        # A credential that may read models but not use them is refused both ways.
        reader = running.gateway.auth.issue_token(
            sub="bob", ttl=600, scopes=frozenset({"models:read"})
        )
        only_read = {"authorization": f"Bearer {reader}"}
        r = await http.post(
            "/v1/audio/transcriptions",
            headers=only_read,
            files={"file": upload},
            data={"model": "whisper"},
        )
        assert r.status_code == 403, r.text
        r = await http.post(
            "/v1/audio/speech", headers=only_read, json={"model": "voice", "input": "Hi."}
        )
        assert r.status_code == 403, r.text
        r = await http.post("/v1/audio/speech", json={"model": "voice", "input": "Hi."})
        assert r.status_code == 401
        # No credential, no transcription.
        r = await http.post(
            "/v1/audio/transcriptions", files={"file": upload}, data={"model": "whisper"}
        )
        assert r.status_code == 401
    ok = await client.audio.transcriptions.create(model="whisper", file=upload)
    assert _words(ok.text) == _words(FOX + " " + APPLES)


def test_subtitle_formats() -> None:
    segments = [
        TranscriptSegment(id=0, start=0.0, end=1.5, text=" Hello."),
        TranscriptSegment(id=1, start=3661.25, end=3662.0, text=" Again."),
    ]
    assert srt(segments) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n01:01:01,250 --> 01:01:02,000\nAgain.\n"
    )
    assert vtt(segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n\n01:01:01.250 --> 01:01:02.000\nAgain.\n"
    )


async def test_concurrent_transcriptions_each_get_their_own_text(
    client: openai.AsyncOpenAI, speech: bytes
) -> None:
    upload = ("speech.wav", speech, "audio/wav")
    results = await asyncio.gather(
        *(client.audio.transcriptions.create(model="whisper", file=upload) for _ in range(2))
    )
    assert {r.text for r in results} == {results[0].text}
    assert _words(results[0].text) == _words(FOX + " " + APPLES)


@pytest.mark.parametrize("fmt", ["mp3", "wav", "opus", "flac"])
async def test_spoken_text_transcribes_back_to_its_words(
    client: openai.AsyncOpenAI, fmt: str
) -> None:
    """The official client's streaming speech call, in each compressed format and WAV,
    gives audio the recogniser turns back into the same words."""
    async with client.audio.speech.with_streaming_response.create(
        model="voice",
        voice="alloy",
        input=FOX,
        response_format=fmt,  # type: ignore[arg-type]
    ) as response:
        assert response.headers["content-type"].startswith("audio/")
        audio = b"".join([chunk async for chunk in response.iter_bytes()])
    heard = await client.audio.transcriptions.create(model="whisper", file=(f"speech.{fmt}", audio))
    assert _words(heard.text) == _words(FOX)


async def test_speech_requests_are_checked(client: openai.AsyncOpenAI) -> None:
    for kwargs, status, said in (
        ({"input": ""}, 400, "empty"),
        ({"input": "hi", "speed": 4.0}, 400, "speed"),
        ({"input": "hi", "response_format": "ogg"}, 400, "response_format"),
        ({"input": "x" * 4097}, 413, "4096"),
        ({"input": "hi", "model": "script"}, 400, "does not synthesise"),
    ):
        args = {"model": "voice", "voice": "alloy", **kwargs}
        with pytest.raises(openai.APIStatusError) as err:
            await client.audio.speech.create(**args)  # type: ignore[arg-type]
        assert err.value.status_code == status and said in str(err.value), err.value
    pcm = await client.audio.speech.create(
        model="voice", voice="alloy", input="Fine.", response_format="pcm"
    )
    assert len(pcm.content) > 24000 // 4 and len(pcm.content) % 2 == 0


# -- the store -----------------------------------------------------------------------------


async def test_the_catalog_pulls_whisper_from_its_wheel_checking_every_file(
    tmp_path: Path, voice: Path
) -> None:
    """``whisper-tiny.en`` is a folder inside a wheel: pulled with pip, every file's digest
    checked, stored as a whisper model whose facts say it transcribes; a wrong digest
    stores nothing; a voice folder imports as a hibari model."""
    good = BUILTIN_CATALOG["whisper-tiny.en"]
    files = {**good.files, "config.json": "0" * 64}
    bad = CatalogEntry(source=good.source, files=files, description="tampered")
    mgr = ModelManager(ModelStore(tmp_path / "models"), {"whisper-tiny.en": good})
    record = await mgr.pull("whisper-tiny.en")
    assert record.manifest.format == "whisper"
    assert {f.path for f in record.manifest.files} == set(good.files)
    facts = mgr.store.facts(record)
    assert facts is not None and facts.capabilities == ("transcription",)
    assert kind_of(facts) == "asr"
    assert find_entry(str(mgr.store.model_path(record))).name == "whisper"
    assert list(mgr.store.partial.iterdir()) == []  # the wheel is not kept

    other = ModelManager(ModelStore(tmp_path / "other"), {"tampered": bad})
    with pytest.raises(StoreError) as err:
        await other.pull("tampered")
    assert err.value.reason == "digest_mismatch" and other.store.models() == []

    spoken = await mgr.pull("heart", source=str(voice))
    assert spoken.manifest.format == "hibari"
    facts = mgr.store.facts(spoken)
    assert facts is not None and facts.capabilities == ("speech",) and kind_of(facts) == "tts"


def test_live_clips_queued_together_are_encoded_and_decoded_together(
    whisper_tiny: Path, voice: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams' utterances queued at once (the worker's job loop, a real Whisper model):
    the two of one length are encoded in one step and decoded in the next, each with its
    own words; a longer one goes on its own (padding a clip with silence changes its
    words), and a partial (a lower priority) is not taken along."""
    import wave as wavemod

    from hibari import Hibari

    from engine import ipc
    from engine.backends import find_entry
    from engine.backends.base import LoadParams
    from engine.jobs import JobQueue

    tts = Hibari()
    # Two utterances cut to one length (four seconds of features) and one longer.
    sentences = [APPLES, "Every morning the baker opens the shop.", FOX]
    clips = [_wav(np.asarray(tts(text), np.float32), tts.sample_rate) for text in sentences]
    with wavemod.open(io.BytesIO(clips[0])) as w:
        assert w.getframerate() == tts.sample_rate
    backend = find_entry(str(whisper_tiny)).backend_class().load(str(whisper_tiny), LoadParams())
    sent: list[ipc.FromWorker] = []
    jobs = JobQueue(sent.append, lambda raw: sent.append(ipc.decode_from_worker(raw[4:])))
    live = TranscribeOptions(live=True)
    for req, audio in enumerate(clips, start=1):
        jobs.start(
            ipc.Transcribe(req=req, model="asr", audio=audio, options=live, priority=2),
            backend,
            req,
            "asr",
        )
    jobs.start(
        ipc.Transcribe(req=9, model="asr", audio=clips[0], options=live, priority=-1),
        backend,
        9,
        "asr",
    )
    jobs.step()
    assert sent == []  # one step: the two of one length encoded (nothing to say yet)
    jobs.step()
    done = [x.req for x in sent if isinstance(x, ipc.Transcribed)]
    assert done == [1, 2]  # the next: both decoded; the longer one and the partial wait
    while jobs:
        jobs.step()
    done = [x.req for x in sent if isinstance(x, ipc.Transcribed)]
    assert done == [1, 2, 3, 9]
    texts = {
        x.req: " ".join(s.text for s in x.segments)
        for x in sent
        if isinstance(x, ipc.TranscriptPart)
    }

    # (A batch's arithmetic may differ from one clip's in the last bits: this sentence's
    # "apples" then reads "apple", so plurals are not compared.)
    def stems(text: str) -> list[str]:
        return [w.rstrip("s") for w in _words(text)]

    for req, text in zip((1, 2, 3), sentences, strict=True):
        assert stems(texts[req]) == stems(text), texts[req]
    assert stems(texts[9]) == stems(APPLES)

    # A live clip longer than Whisper's 30 s window is no live clip: the ordinary
    # transcription takes it (decoded once, whole), with its words.
    speech = np.asarray(tts(FOX), np.float32)
    pause = np.zeros(tts.sample_rate * 31, np.float32)
    long = _wav(np.concatenate([pause, speech]), tts.sample_rate)
    sent.clear()
    jobs.start(
        ipc.Transcribe(req=20, model="asr", audio=long, options=live, priority=2),
        backend,
        20,
        "asr",
    )
    while jobs:
        jobs.step()
    assert [x.req for x in sent if isinstance(x, ipc.Transcribed)] == [20]
    heard = " ".join(
        seg.text for x in sent if isinstance(x, ipc.TranscriptPart) for seg in x.segments
    )
    # (Whisper may hear a "you" in the long silence: the sentence is checked at the end.)
    assert stems(heard)[-len(stems(FOX)) :] == stems(FOX), heard
