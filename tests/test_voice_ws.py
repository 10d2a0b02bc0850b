"""WebSocket voice on a real server: speak, listen, spoken answers and barge-in.

Real models throughout: the hibari voice speaks the audio, Silero VAD finds
the speech in it, Whisper tiny.en transcribes it, and a tiny script model
(whose answer is known) answers. Checks are on outcomes and event order:
transcripts come back as the spoken words, settled words are never revised,
a voice turn runs question -> transcript -> text and audio -> done, speech
over an answer cancels it and the conversation keeps what was said, audio
out waits for credit, and bad audio gets typed errors while the session
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
from gateway.config import AuthConfig, LimitsConfig, VoiceConfig
from gateway.server import RunningServer
from protocol import messages as m

from .gateway_helpers import Client, client, gateway, server_config

FOX = "The quick brown fox jumps over the lazy dog."
APPLES = "Green apples sit on the kitchen table."
ANSWER = "Hi. Ok! Yes? "  # every token of a script is distinct
RATE = 24000


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _stems(text: str) -> set[str]:
    """The words without a plural s: live decoding may hear "apple" for "apples"."""
    return {w.removesuffix("s") for w in _words(text)}


@pytest.fixture(scope="module")
def answer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Answers ANSWER, over and over, whatever it is asked."""
    path = tmp_path_factory.mktemp("voice") / "answer.gguf"
    return write_tiny_llama(path, script=ANSWER, spec=TinyLlamaSpec(n_ctx=2048))


@pytest.fixture
async def running(
    tmp_path: Path, whisper_tiny: Path, voice: Path, silero_vad: Path, answer_model: Path
) -> AsyncIterator[RunningServer]:
    models = {"whisper": whisper_tiny, "voice": voice, "answer": answer_model}
    config = server_config(
        tmp_path,
        models,
        auth=AuthConfig(loopback_without_token=False),
        voice=VoiceConfig(vad_model=str(silero_vad)),
        limits=LimitsConfig(max_frame_bytes=256 * 1024),
    )
    async with gateway(config) as srv:
        yield srv


@contextlib.asynccontextmanager
async def session(srv: RunningServer, **hello: object) -> AsyncIterator[Client]:
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
    async with client(srv, token, hello=False, max_size=None) as c:
        await c.hello(**hello)
        yield c


async def spoken(c: Client, text: str, gen_id: str = "say") -> bytes:
    """``text`` spoken by the server (``speak``): its 24 kHz PCM."""
    await c.send(m.Speak(id=gen_id, model="voice", text=text))
    pcm = []
    while True:
        msg = await c.recv()
        if isinstance(msg, m.AudioOut) and msg.id == gen_id:
            assert msg.rate == RATE and msg.format == "pcm16" and msg.seq == len(pcm)
            pcm.append(msg.data)
        elif isinstance(msg, m.Done) and msg.id == gen_id:
            assert msg.finish_reason == "stop"
            return b"".join(pcm)


def silence(seconds: float) -> bytes:
    return bytes(2 * int(RATE * seconds))


async def send_audio(c: Client, pcm: bytes, *, pace: float = 0.0, frame_s: float = 0.1) -> None:
    """Raw binary frames of ``frame_s`` each; ``pace`` seconds of wall time per second of audio."""
    step = 2 * int(RATE * frame_s)
    for i in range(0, len(pcm), step):
        await c.send_raw(pcm[i : i + step])
        if pace:
            await asyncio.sleep(frame_s * pace)


def _brief(msg: m.ServerMessage) -> str:
    if isinstance(msg, m.AudioOut):
        return f"audio:{msg.id}:{msg.seq}:{msg.text}"
    if isinstance(msg, m.Delta):
        return f"delta:{msg.id}"
    return repr(msg)


async def until(c: Client, done_id: str, into: list[m.ServerMessage]) -> m.ServerMessage:
    """Messages into ``into`` until the ``done`` (or error) of ``done_id``; returns that one."""
    while True:
        try:
            msg = await asyncio.wait_for(c.recv(), 60)
        except TimeoutError:
            raise AssertionError(f"no done for {done_id}: {[_brief(x) for x in into]}") from None
        into.append(msg)
        if isinstance(msg, m.Done | m.Error) and getattr(msg, "id", None) == done_id:
            return msg


async def test_speech_round_trips_and_settled_words_are_never_revised(
    running: RunningServer,
) -> None:
    """The server's own speech, listened to at the pace it is spoken: the words come
    back; partials come before the final transcript; every partial's settled words
    begin every later partial and the final text; nothing follows the final."""
    async with session(running) as c:
        pcm = await spoken(c, f"{FOX} {APPLES}")
        # Both sentences in one utterance: the pause between them is shorter than this.
        vad = m.VadOptions(silence_ms=1500)
        await c.send(m.Listen(id="l1", model="whisper", rate=RATE, vad=vad))
        got: list[m.ServerMessage] = []
        await send_audio(c, silence(0.5) + pcm + silence(2.0), pace=1.0)
        await c.send(m.Audio(id="l1", end=True))
        done = await until(c, "l1", got)
    assert isinstance(done, m.Done) and done.finish_reason == "stop"
    kinds = [
        (type(x).__name__, getattr(x, "event", None) or getattr(x, "final", None))
        for x in got
        if isinstance(x, m.Started | m.SpeechEdge | m.TranscriptEvent)
    ]
    assert kinds[0] == ("Started", None) and kinds[1] == ("SpeechEdge", "start")
    assert kinds[-2:] == [("SpeechEdge", "end"), ("TranscriptEvent", True)]
    transcripts = [x for x in got if isinstance(x, m.TranscriptEvent)]
    assert {x.utterance for x in transcripts} == {1}
    partials, final = transcripts[:-1], transcripts[-1]
    assert partials, "no partial transcript while speaking"
    settled_before: list[str] = []
    for p in partials:
        assert _words(p.text)[: len(settled_before)] == settled_before
        assert _words(p.settled) == _words(p.text)[: len(_words(p.settled))]
        settled_before = _words(p.settled)
    assert _words(final.text)[: len(settled_before)] == settled_before
    assert {"fox", "dog", "apple", "table"} <= _stems(final.text), final.text
    assert 0.3 < final.start < final.end <= len(pcm) / 2 / RATE + 0.6


async def test_a_voice_turn_answers_in_text_and_speech(running: RunningServer) -> None:
    async with session(running) as c:
        question = await spoken(c, APPLES)
        reply = m.Reply(model="answer", voice="voice", options=m.Options(max_tokens=40))
        await c.send(m.Listen(id="v", model="whisper", rate=RATE, reply=reply))
        got: list[m.ServerMessage] = []
        await send_audio(c, silence(0.3) + question + silence(1.0))
        done = await until(c, "v.1", got)
        await c.send(m.Audio(id="v", end=True))
        await until(c, "v", got)
    assert isinstance(done, m.Done) and done.finish_reason == "length"
    order = [
        type(x).__name__ + (f":{x.id}" if hasattr(x, "id") else "")
        for x in got
        if not isinstance(x, m.Delta | m.AudioOut | m.TranscriptEvent) or getattr(x, "final", True)
    ]
    first = order.index("Started:v.1")
    assert order[:first] == [
        "Started:v",
        "SpeechEdge:v",
        "SpeechEdge:v",
        "TranscriptEvent:v",
    ]
    final = next(x for x in got if isinstance(x, m.TranscriptEvent) and x.final)
    assert {"apple", "table"} <= _stems(final.text), final.text
    text = "".join(x.text for x in got if isinstance(x, m.Delta) and x.id == "v.1")
    audio = [x for x in got if isinstance(x, m.AudioOut) and x.id == "v.1"]
    assert text == (ANSWER * 10)[: len(text)] and len(text) >= 30
    # Each complete sentence spoken, in order, each chunk naming the sentence it starts.
    assert [x.text for x in audio] == ["Hi.", "Ok!", "Yes?", "Hi.", *[x.text for x in audio[4:]]]
    assert [x.seq for x in audio] == list(range(len(audio))) and all(x.data for x in audio)
    # (That speech starts before the text ends is a matter of speed; the barge-in test
    # below shows the pipelining in order: the answer held after its first sentence's audio.)
    started = next(x for x in got if isinstance(x, m.Started) and x.id == "v.1")
    conv = running.gateway.conversations.get_or_create(
        (None, "alice"), started.conversation or "", ""
    )
    assert [t.role for t in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].content == final.text and conv.messages[1].content == text


async def test_speech_over_an_answer_cancels_it_and_the_conversation_keeps_what_was_said(
    running: RunningServer,
) -> None:
    """Barge-in. Flow control holds the answer after its first audio (the client grants
    little more), then the user speaks again: the speech start comes, the answer is
    cancelled, no more of its audio arrives after its end, and the conversation keeps
    the question and exactly the sentences that were spoken. The next question is
    answered."""
    async with session(running, credits=4000) as c:
        await c.send(m.Credit(bytes=10**6))
        question = await spoken(c, APPLES)
        second = await spoken(c, FOX, "say2")
        await c.send(m.Credit(bytes=10**7))  # what the two speak requests took, and more
        got: list[m.ServerMessage] = []
        reply = m.Reply(model="answer", voice="voice", options=m.Options(max_tokens=200))
        await c.send(m.Listen(id="v", model="whisper", rate=RATE, reply=reply))
        # Leave the answer ~6 KB of credit: it stops after its first audio chunk.
        while True:
            msg = await asyncio.wait_for(c.recv(), 60)
            got.append(msg)
            if isinstance(msg, m.Started) and msg.id == "v":
                break
        await send_audio(c, silence(0.3) + question + silence(1.0))
        while not any(isinstance(x, m.AudioOut) and x.id == "v.1" for x in got):
            got.append(await asyncio.wait_for(c.recv(), 60))
        barge = len(got)
        await send_audio(c, silence(0.3) + second + silence(1.0))
        cancelled = await until(c, "v.1", got)
        assert isinstance(cancelled, m.Done) and cancelled.finish_reason == "cancelled"
        after = got[barge:]
        start2 = next(
            i for i, x in enumerate(after) if isinstance(x, m.SpeechEdge) and x.utterance == 2
        )
        assert start2 < after.index(cancelled)
        # Audio already on its way when the speech began may still land (how much
        # credit the transcripts left depends on how often partials came); none
        # after the answer's end.
        end = got.index(cancelled)
        assert not any(isinstance(x, m.AudioOut) and x.id == "v.1" for x in got[end:])
        await c.send(m.Credit(bytes=10**8))
        answered = await until(c, "v.2", got)
        assert isinstance(answered, m.Done) and answered.finish_reason == "length"
        await c.send(m.Audio(id="v", end=True))
        await until(c, "v", got)
    spoken_first = [x.text for x in got if isinstance(x, m.AudioOut) and x.id == "v.1" and x.text]
    assert spoken_first[0] == "Hi."
    conv = running.gateway.conversations.get_or_create(
        (None, "alice"), cancelled.conversation or "", ""
    )
    roles = [t.role for t in conv.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert conv.messages[1].content == " ".join(spoken_first)  # what was said, no more
    assert {"fox", "dog"} <= _stems(conv.messages[2].content)


async def test_audio_out_waits_for_credit(running: RunningServer) -> None:
    text = "One small step. Another small step. The last step."
    async with session(running, credits=1) as c:
        await c.send(m.Speak(id="s", model="voice", text=text))
        got: list[m.ServerMessage] = []
        while not any(isinstance(x, m.AudioOut) for x in got):
            got.append(await asyncio.wait_for(c.recv(), 60))
        # The first chunk took more than the credit there was: nothing more comes.
        with pytest.raises(TimeoutError):
            got.append(await asyncio.wait_for(c.recv(), 1.0))
        await c.send(m.Credit(bytes=10**7))
        done = await until(c, "s", got)
    assert isinstance(done, m.Done) and done.finish_reason == "stop"
    assert len([x for x in got if isinstance(x, m.AudioOut)]) == 3


async def test_bad_audio_gets_typed_errors_and_the_session_goes_on(
    running: RunningServer,
) -> None:
    async with session(running) as c:

        async def error() -> m.Error:
            msg = await asyncio.wait_for(c.recv(), 60)
            assert isinstance(msg, m.Error), msg
            return msg

        # A rate outside 8-48 kHz; samples with no stream open; an unknown stream.
        await c.send_raw('{"type": "listen", "id": "x", "model": "whisper", "rate": 4000}')
        assert (await error()).code == "bad_request"
        await c.send_raw(bytes(3200))
        assert (await error()).code == "bad_request"
        await c.send(m.Audio(id="nope", data=bytes(320)))
        assert (await error()).code == "not_found"
        # A model that is not there: the stream ends with its error.
        await c.send(m.Listen(id="gone", model="no-such-model"))
        err = await error()
        assert err.code == "model_not_found" and err.id == "gone"
        await c.send(m.Listen(id="l", model="whisper", rate=16000))
        started = await asyncio.wait_for(c.recv(), 60)
        assert isinstance(started, m.Started) and started.id == "l"
        # Half a sample; a frame over the limit; non-speech bytes (noise) are just noise.
        await c.send_raw(bytes(3201))
        assert (await error()).code == "bad_request"
        await c.send_raw(bytes(300 * 1024))
        assert (await error()).code == "too_large"
        await c.send_raw(bytes(range(256)) * 64)
        # Two streams open: a binary frame cannot say which one it is for.
        await c.send(m.Listen(id="l2", model="whisper"))
        started = await asyncio.wait_for(c.recv(), 60)
        assert isinstance(started, m.Started) and started.id == "l2"
        await c.send_raw(bytes(320))
        assert (await error()).code == "bad_request"
        await c.send(m.Cancel(id="l2"))
        done = await asyncio.wait_for(c.recv(), 60)
        assert isinstance(done, m.Done) and done.finish_reason == "cancelled"
        # The session still answers: a chat, and the stream ends when told.
        await c.send(
            m.Chat(
                id="g",
                model="answer",
                messages=[m.ChatMessage("user", "hi")],
                options=m.Options(max_tokens=5),
            )
        )
        got: list[m.ServerMessage] = []
        done = await until(c, "g", got)
        assert isinstance(done, m.Done) and done.finish_reason == "length"
        await c.send(m.Audio(id="l", end=True))
        done = await until(c, "l", got)
        assert isinstance(done, m.Done) and done.finish_reason == "stop"
        assert not [x for x in got if isinstance(x, m.Error)]


async def test_audio_faster_than_it_can_be_transcribed_is_refused(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Minutes of speech sent at once: recognition cannot keep up, so the audio
    waiting for it is capped and further frames get ``overloaded``. (The cap is
    lowered here to 20 s, far below the 4.5 minutes sent, so that how fast this
    machine recognises speech at the moment cannot decide the outcome.)"""
    from gateway import listening

    monkeypatch.setattr(listening, "MAX_PENDING_S", 20.0)
    async with session(running) as c:
        pcm = await spoken(c, f"{FOX} {APPLES}")
        await c.send(m.Listen(id="l", model="whisper", rate=RATE))
        started = await asyncio.wait_for(c.recv(), 60)
        assert isinstance(started, m.Started)
        errors: list[m.Error] = []
        step = 2 * RATE * 2  # two seconds a frame
        for _ in range(40):  # ~4.5 minutes of speech
            for i in range(0, len(pcm), step):
                await c.send(m.Audio(id="l", data=pcm[i : i + step]))
        await c.send(m.Cancel(id="l"))
        got: list[m.ServerMessage] = []
        await until(c, "l", got)
        errors = [x for x in got if isinstance(x, m.Error)]
    assert errors and all(e.code == "overloaded" and e.id == "l" for e in errors)


async def test_the_python_client_holds_a_voice_conversation(running: RunningServer) -> None:
    """The SDK's speak and listen, with flow control on a window smaller than the audio:
    the client grants credit as the answer is read, and the turn completes."""
    from ferrous_client import FerrousClient
    from ferrous_client.protocol import messages as cm  # the client's own message types

    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    async with FerrousClient(
        running.ws_url, token=token, subprotocol="msgpack", credits=32 * 1024
    ) as client:
        question = await client.speak("voice", APPLES).audio()
        assert len(question) > 64 * 1024  # more than the window: credit was granted
        reply = cm.Reply(model="answer", voice="voice", options=cm.Options(max_tokens=24))
        stream = client.listen("whisper", rate=RATE, reply=reply)
        await stream.send(silence(0.3) + question + silence(1.0))
        kinds: list[str] = []
        answer_audio = 0
        async for event in stream:
            kinds.append(f"{type(event).__name__}:{event.id}")
            if isinstance(event, cm.AudioOut):
                answer_audio += len(event.data)
            if isinstance(event, cm.Done) and event.id == f"{stream.id}.1":
                assert event.finish_reason == "length"
                await stream.end()
    assert stream.done is not None and stream.done.finish_reason == "stop"
    assert len(stream.transcripts) == 1 and "table" in _stems(stream.transcripts[0])
    assert answer_audio > 0 and stream.answering is None
    sid = stream.id
    assert kinds[0] == f"Started:{sid}" and kinds[-1] == f"Done:{sid}"
    assert kinds.index(f"Started:{sid}.1") < kinds.index(f"AudioOut:{sid}.1")
