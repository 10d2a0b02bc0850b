"""Audio bytes in any common container to the samples a speech model reads, with bounded work.

Uploads arrive as files (wav, mp3, ogg/opus, m4a, webm, flac): PyAV (FFmpeg)
demuxes and decodes the first audio stream and resamples it to mono float32
at the model's rate, frame by frame. Decoding stops with ``too_large`` as
soon as the audio passes ``max_seconds`` (a 2-hour upload costs what
``max_seconds`` costs, not 460 MB of samples), and anything FFmpeg cannot
read is ``bad_request`` naming what was wrong, never an exception from the
library.
"""

from __future__ import annotations

import io

import numpy as np

from protocol.errors import BadRequest, TooLarge

__all__ = ["decode_audio"]


def decode_audio(data: bytes, *, rate: int, max_seconds: float) -> np.ndarray:
    """Mono float32 samples at ``rate`` Hz of the first audio stream in ``data``."""
    import av  # FFmpeg; imported where audio is decoded only

    if not data:
        raise BadRequest("the audio is empty")
    limit = int(max_seconds * rate)
    parts: list[np.ndarray] = []
    have = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise BadRequest("the file holds no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(streams[0]):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    have += samples.size
                    if have > limit:
                        raise TooLarge(
                            f"the audio is longer than {max_seconds:g} s, the most one request takes"
                        )
                    parts.append(samples)
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except (BadRequest, TooLarge):
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise BadRequest(f"the audio could not be decoded: {exc}") from None
    if not parts:
        raise BadRequest("the audio holds no samples")
    audio = np.concatenate(parts).astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise BadRequest("the audio holds samples that are not numbers")
    return audio
