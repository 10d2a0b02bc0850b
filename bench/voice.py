"""Speech through ``ferrous serve``: how fast audio becomes text and text becomes audio.

    python -m bench.voice [--runs 3] [--threads N] [--json]

One server with Whisper tiny.en (``engine.whispertiny``) and the hibari voice
(``engine.hibarivoices``), both from their PyPI wheels, through the OpenAI
routes a client uses:

* **tts** — ``/v1/audio/speech`` (``pcm``, streamed) for a three-sentence
  paragraph: time to the first audio bytes, and the real-time factor (wall
  time of the whole answer / seconds of audio; below 1 is faster than real
  time);
* **asr** — ``/v1/audio/transcriptions`` of that speech (WAV): the real-time
  factor of a transcription (target: 0.2 or less on two cores), and whether the
  words came back.

* **turn** — a spoken conversation over the WebSocket (``listen`` with a
  ``reply``: Silero VAD, Whisper tiny.en, SmolLM2 and the hibari voice): a
  question is streamed at the pace it is spoken, in 20 ms frames, and the
  figure is the time from the end of its speech (its last sound above
  -36 dBFS) to the first audio of the answer (target: 800 ms or less). It
  includes the silence the server waits for before it decides the speaker
  has finished (``silence_ms``, 400 ms by default). Then the same with ``--sessions`` (4) sessions speaking at the same
  moment: the 95th percentile of their turns (target: 1.5 s or less).
* **barge-in** — speech over a spoken answer that the client plays (and grants
  credit for) at real time: the time from the first sound of the new speech
  to the answer's ``done`` with ``cancelled`` (target: 200 ms or less).

Medians over ``--runs``. Speech is synthesised by the server itself, so the
figures also check each other: the transcript must give back the text.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
import wave
from array import array

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench.serving import start_server, stop_server
from engine.client import default_threads
from engine.hibarivoices import fetch_hibari_voice
from engine.silerovad import fetch_silero_vad
from engine.smollm2 import fetch_smollm2
from engine.whispertiny import fetch_whisper_tiny
from protocol import messages as m
from protocol.codec import codec_for

__all__ = ["main", "measure"]

TEXT = (
    "The quick brown fox jumps over the lazy dog. Seven green apples sit on the "
    "kitchen table. Every morning the baker opens the shop at dawn."
)
RATE = 24000


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower().replace("7", "seven"))


def _wav(pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm)
    return buf.getvalue()


def measure(base: str, runs: int) -> dict[str, object]:
    first_ms, tts_rtf, asr_rtf, matched = [], [], [], []
    with httpx.Client(base_url=base, timeout=300) as http:
        for _ in range(runs + 1):  # the first round warms both models up, not counted
            t0 = time.perf_counter()
            first = None
            parts: list[bytes] = []
            body = {"model": "voice", "input": TEXT, "voice": "alloy", "response_format": "pcm"}
            with http.stream("POST", "/v1/audio/speech", json=body) as r:
                r.raise_for_status()
                for chunk in r.iter_bytes():
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(chunk)
            wall = time.perf_counter() - t0
            pcm = b"".join(parts)
            seconds = len(pcm) / 2 / RATE
            t0 = time.perf_counter()
            r = http.post(
                "/v1/audio/transcriptions",
                data={"model": "whisper"},
                files={"file": ("speech.wav", _wav(pcm), "audio/wav")},
            )
            r.raise_for_status()
            asr_wall = time.perf_counter() - t0
            if first is None:
                raise SystemExit("the speech route sent no audio")
            first_ms.append(first * 1000)
            tts_rtf.append(wall / seconds)
            asr_rtf.append(asr_wall / seconds)
            matched.append(_words(r.json()["text"]) == _words(TEXT))
    keep = slice(1, None)
    return {
        "audio_seconds": round(seconds, 2),
        "tts_first_audio_ms": round(statistics.median(first_ms[keep]), 1),
        "tts_real_time_factor": round(statistics.median(tts_rtf[keep]), 3),
        "asr_real_time_factor": round(statistics.median(asr_rtf[keep]), 3),
        "asr_words_back": all(matched[keep]),
    }


QUESTION = "What is the capital of France?"
DEBUG = bool(os.environ.get("BENCH_VOICE_DEBUG"))
FRAME_S = 0.02  # a browser's audio worklet sends about this much at a time
_CODEC = codec_for(m.SUBPROTOCOL_MSGPACK)


async def _recv(ws: ClientConnection) -> m.ServerMessage:
    return _CODEC.decode_server(await ws.recv())


async def _spoken(ws: ClientConnection, text: str) -> bytes:
    await ws.send(_CODEC.encode(m.Speak(id="q", model="voice", text=text)))
    parts = []
    while not isinstance(msg := await _recv(ws), m.Done):
        if isinstance(msg, m.AudioOut):
            parts.append(msg.data)
    return b"".join(parts)


def _trailing_quiet(pcm: bytes) -> int:
    """Bytes of near-silence (below -36 dBFS) at the end of ``pcm``: the voice's own pause
    after its last word, which is not speech: the end of speech is before it."""
    samples = array("h")
    samples.frombytes(pcm)
    n = len(samples)
    while n and abs(samples[n - 1]) < 500:
        n -= 1
    return 2 * (len(samples) - n)


async def _turn(ws: ClientConnection, gen_id: str, question: bytes) -> float:
    """One voice turn: seconds from the end of the question's speech to the answer's
    first audio."""
    reply = m.Reply(model="chat", voice="voice", options=m.Options(max_tokens=48))
    await ws.send(_CODEC.encode(m.Listen(id=gen_id, model="whisper", rate=RATE, reply=reply)))
    audio = bytes(2 * int(0.3 * RATE)) + question
    speech_end = len(audio) - _trailing_quiet(question)
    audio += bytes(2 * int(1.5 * RATE))
    step = 2 * int(FRAME_S * RATE)
    ended = asyncio.get_running_loop().create_future()

    async def talk() -> None:
        start = time.perf_counter()
        for k, i in enumerate(range(0, len(audio), step)):
            await asyncio.sleep(max(0.0, start + k * FRAME_S - time.perf_counter()))
            await ws.send(_CODEC.encode(m.Audio(id=gen_id, data=audio[i : i + step])))
            if i + step >= speech_end and not ended.done():
                ended.set_result(time.perf_counter())

    talking = asyncio.create_task(talk())
    first = None
    marks: dict[str, float] = {}
    while True:
        msg = await asyncio.wait_for(_recv(ws), 120)
        name = type(msg).__name__
        if isinstance(msg, m.SpeechEdge | m.TranscriptEvent):
            name += f":{getattr(msg, 'event', '')}{getattr(msg, 'final', '')}"
        marks.setdefault(name, time.perf_counter())
        if isinstance(msg, m.Delta):
            marks["deltas"] = marks.get("deltas", 0) + 1
        if isinstance(msg, m.AudioOut) and first is None:
            first = time.perf_counter()
            if DEBUG:
                print(repr(msg.text), marks.get("deltas"), file=sys.stderr)
        elif isinstance(msg, m.Error):
            raise SystemExit(f"voice turn failed: {msg.code}: {msg.message}")
        elif isinstance(msg, m.Done) and msg.id == f"{gen_id}.1":
            break
    await talking
    await ws.send(_CODEC.encode(m.Audio(id=gen_id, end=True)))
    while not (isinstance(msg := await _recv(ws), m.Done) and msg.id == gen_id):
        pass
    if first is None:
        raise SystemExit("the answer had no audio")
    if DEBUG:
        print({k: round((v - ended.result()) * 1000) for k, v in marks.items()}, file=sys.stderr)
    return float(first - ended.result())


async def voice_turns(url: str, runs: int, sessions: int) -> dict[str, object]:
    """End of speech -> first audio of the answer, one session alone, then ``sessions``
    speaking at once (the first turn of each warms up and is not counted)."""

    async def session(count: int, barrier: asyncio.Barrier | None) -> list[float]:
        async with connect(url, subprotocols=[m.SUBPROTOCOL_MSGPACK], max_size=None) as ws:  # type: ignore[list-item]
            await ws.send(_CODEC.encode(m.Hello()))
            await _recv(ws)
            question = await _spoken(ws, QUESTION)
            out = []
            for r in range(count + 1):
                if barrier is not None:
                    await barrier.wait()
                took = await _turn(ws, f"t{r}", question)
                if r:
                    out.append(took * 1000)
            return out

    alone = await session(runs, None)
    barrier = asyncio.Barrier(sessions)
    together = await asyncio.gather(*(session(runs, barrier) for _ in range(sessions)))
    loaded = sorted(x for xs in together for x in xs)
    return {
        "turn_first_audio_ms": round(statistics.median(alone), 1),
        "sessions": sessions,
        "turn_first_audio_p95_ms": round(
            loaded[min(len(loaded) - 1, round(0.95 * (len(loaded) - 1)))], 1
        ),
        "turn_first_audio_p50_loaded_ms": round(statistics.median(loaded), 1),
    }


def _leading_quiet(pcm: bytes) -> int:
    """Bytes of near-silence (below -36 dBFS) before the first sound of ``pcm``."""
    samples = array("h")
    samples.frombytes(pcm)
    n = 0
    while n < len(samples) and abs(samples[n]) < 500:
        n += 1
    return 2 * n


async def _talk(
    ws: ClientConnection, gen_id: str, pcm: bytes, onset: asyncio.Future[float] | None = None
) -> None:
    """``pcm`` in 20 ms frames at the pace it is spoken; ``onset`` gets the time the frame
    with its first sound went out."""
    start = time.perf_counter()
    sound = _leading_quiet(pcm)
    step = 2 * int(FRAME_S * RATE)
    for k, i in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, start + k * FRAME_S - time.perf_counter()))
        await ws.send(_CODEC.encode(m.Audio(id=gen_id, data=pcm[i : i + step])))
        if onset is not None and i + step > sound and not onset.done():
            onset.set_result(time.perf_counter())


async def barge_in(url: str, runs: int) -> dict[str, object]:
    """Speech over a spoken answer: milliseconds from the first sound of the new speech
    to the answer's ``done`` (cancelled). The client plays the answer as it comes and
    grants credit at the pace it plays, so the answer is still going when it is
    interrupted."""
    async with connect(url, subprotocols=[m.SUBPROTOCOL_MSGPACK], max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(_CODEC.encode(m.Hello(credits=64 * 1024)))
        await _recv(ws)
        await ws.send(_CODEC.encode(m.Credit(bytes=1 << 30)))  # the two questions, unplayed
        question = await _spoken(ws, QUESTION)
        other = await _spoken(ws, "Tell me about the sea.")
        took = []
        for r in range(runs + 1):
            gen_id = f"b{r}"
            # A long answer (end of generation ignored), so there is one to interrupt.
            long = m.Options(max_tokens=160, ignore_eos=True)
            reply = m.Reply(model="chat", voice="voice", options=long)
            listen = m.Listen(id=gen_id, model="whisper", rate=RATE, reply=reply)
            await ws.send(_CODEC.encode(listen))
            onset = asyncio.get_running_loop().create_future()

            async def play_later(n: int) -> None:
                await asyncio.sleep(n / 2 / RATE)  # granted back as it is played
                await ws.send(_CODEC.encode(m.Credit(bytes=n)))

            quiet = bytes(2 * int(0.3 * RATE))
            talking = asyncio.create_task(_talk(ws, gen_id, quiet + question + quiet * 3))
            playing: set[asyncio.Task[None]] = set()
            interrupted = None
            while True:
                msg = await asyncio.wait_for(_recv(ws), 120)
                if isinstance(msg, m.Delta):
                    await ws.send(_CODEC.encode(m.Credit(bytes=len(msg.text.encode()))))
                elif isinstance(msg, m.AudioOut):
                    playing.add(asyncio.create_task(play_later(len(msg.data))))
                    if msg.seq == 0 and msg.id == f"{gen_id}.1":
                        await talking
                        talking = asyncio.create_task(
                            _talk(ws, gen_id, quiet + other + quiet * 3, onset)
                        )
                elif isinstance(msg, m.Done) and msg.id == f"{gen_id}.1":
                    if msg.finish_reason != "cancelled":
                        raise SystemExit("the answer ended before it was interrupted")
                    interrupted = time.perf_counter()
                elif isinstance(msg, m.Done) and msg.id == f"{gen_id}.2":
                    break
            await talking
            await ws.send(_CODEC.encode(m.Audio(id=gen_id, end=True)))
            while not (isinstance(msg := await _recv(ws), m.Done) and msg.id == gen_id):
                pass
            for task in playing:
                task.cancel()
            assert interrupted is not None
            if r:
                took.append((interrupted - onset.result()) * 1000)
    return {
        "barge_in_ms": round(statistics.median(took), 1),
        "barge_in_max_ms": round(max(took), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.voice", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        proc, port = start_server(
            fetch_whisper_tiny(),
            home=home,
            threads=args.threads,
            name="whisper",
            more={"voice": fetch_hibari_voice(), "chat": fetch_smollm2()},
            ready_path="/healthz",
            env={"FERROUS_VOICE__VAD_MODEL": str(fetch_silero_vad())},
        )
        try:
            result = {"threads": args.threads, **measure(f"http://127.0.0.1:{port}", args.runs)}
            url = f"ws://127.0.0.1:{port}/v1/ws"
            result.update(asyncio.run(voice_turns(url, args.runs, args.sessions)))
            result.update(asyncio.run(barge_in(url, args.runs)))
        finally:
            stop_server(proc)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
