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

Medians over ``--runs``. Speech is synthesised by the server itself, so the
two figures also check each other: the transcript must give back the text.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import tempfile
import time
import wave

import httpx

from bench.serving import start_server, stop_server
from engine.client import default_threads
from engine.hibarivoices import fetch_hibari_voice
from engine.whispertiny import fetch_whisper_tiny

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.voice", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        proc, port = start_server(
            fetch_whisper_tiny(),
            home=home,
            threads=args.threads,
            name="whisper",
            more={"voice": fetch_hibari_voice()},
            ready_path="/healthz",
        )
        try:
            result = {"threads": args.threads, **measure(f"http://127.0.0.1:{port}", args.runs)}
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
