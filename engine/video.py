"""Video in: frames sampled and the soundtrack taken out, with bounded memory and time.

A video is read by PyAV (FFmpeg) straight from the uploaded bytes; nothing
is written to disk. :func:`probe` reads the container's header (duration,
streams, frame size) and refuses what is over the limits before anything is
decoded: longer than ``max_seconds`` (a 4-hour film costs a header read),
frames over :data:`engine.images.MAX_PIXELS`, no video stream. Streams that
do not say their duration are stopped at the limit while decoding.

:func:`sample_frames` decodes the video stream and keeps one frame every
``every`` seconds, scaled down to at most :data:`FRAME_SIDE` pixels on its long
side and encoded as JPEG, so memory holds one decoded frame at a time plus
the small JPEGs a caller has not taken yet (it is an iterator).
:func:`soundtrack` decodes the first audio stream to 16 kHz mono and
compresses it (Ogg/Opus), a few MB per hour of speech, which is what a
speech recognition job then reads. Anything FFmpeg cannot read is
``bad_request`` naming why; these functions block, so callers run them in a
thread.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.images import MAX_PIXELS
from protocol.errors import BadRequest, TooLarge

__all__ = ["FRAME_SIDE", "MAX_DECODED_FRAMES", "VideoInfo", "probe", "sample_frames", "soundtrack"]

FRAME_SIDE = 512  # the longest side of a sampled frame, in pixels
MAX_DECODED_FRAMES = 200_000  # frames one read decodes, sampled or not (an hour at 55 fps)
_SPEECH_RATE = 16000


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds (0 when the container does not say)
    width: int
    height: int
    has_audio: bool
    codec: str


def _open(data: bytes) -> Any:
    import av

    if not data:
        raise BadRequest("the video is empty")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise BadRequest(f"the video could not be read: {exc}") from None


def probe(data: bytes, *, max_seconds: float) -> VideoInfo:
    """What the container says about ``data``; BadRequest / TooLarge before decoding."""
    with _open(data) as container:
        if not container.streams.video:
            raise BadRequest("the file holds no video stream")
        stream = container.streams.video[0]
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        if duration > max_seconds:
            raise TooLarge(
                f"the video is {duration:.0f} s long; one request takes at most {max_seconds:g} s"
            )
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width * height > MAX_PIXELS:
            raise TooLarge(f"the video's frames are {width}x{height}; at most {MAX_PIXELS} pixels")
        codec = stream.codec_context.name if stream.codec_context else ""
        return VideoInfo(duration, width, height, bool(container.streams.audio), str(codec))


def sample_frames(
    data: bytes, *, every: float, max_seconds: float, stop: threading.Event | None = None
) -> Iterator[tuple[float, bytes]]:
    """``(seconds, JPEG)`` of one frame every ``every`` seconds, in order (see the module).

    ``stop``, once set, ends the iteration at the next decoded frame: a cancelled
    analysis gives its decoding thread back within one frame. At most
    :data:`MAX_DECODED_FRAMES` are decoded, however many the stream holds (frames
    with no timestamps, or thousands a second, are work all the same).
    """
    import av

    if every <= 0:
        raise BadRequest("the frame interval must be positive")
    container = _open(data)
    try:
        if not container.streams.video:
            raise BadRequest("the file holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        due = 0.0
        for decoded, frame in enumerate(container.decode(stream), 1):
            if stop is not None and stop.is_set():
                return
            if decoded > MAX_DECODED_FRAMES:
                raise TooLarge(f"the video has more than {MAX_DECODED_FRAMES} frames to decode")
            if frame.time is None:
                continue
            t = float(frame.time)
            if t > max_seconds:
                raise TooLarge(f"the video is longer than {max_seconds:g} s, the most one takes")
            if t + 1e-6 < due:
                continue
            while due <= t + 1e-6:
                due += every
            yield round(t, 3), _jpeg(frame.to_image())
    except (BadRequest, TooLarge):
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise BadRequest(f"the video could not be decoded: {exc}") from None
    finally:
        container.close()


def _jpeg(img: Any) -> bytes:
    scale = FRAME_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def soundtrack(data: bytes, *, max_seconds: float) -> bytes | None:
    """The first audio stream as 16 kHz mono Ogg/Opus, or None when there is none."""
    from engine.audio import AudioEncoder, decode_audio

    with _open(data) as container:
        if not container.streams.audio:
            return None
    samples = decode_audio(data, rate=_SPEECH_RATE, max_seconds=max_seconds)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    encoder = AudioEncoder("opus", _SPEECH_RATE)
    return encoder.encode(pcm) + encoder.close()
