"""Audio in and out: uploads decoded to a speech model's samples, speech encoded for a client.

Uploads arrive as files (wav, mp3, ogg/opus, m4a, webm, flac): PyAV (FFmpeg)
demuxes and decodes the first audio stream and resamples it to mono float32
at the model's rate, frame by frame. Decoding stops with ``too_large`` as
soon as the audio passes ``max_seconds`` (a 2-hour upload costs what
``max_seconds`` costs, not 460 MB of samples), and anything FFmpeg cannot
read is ``bad_request`` naming what was wrong, never an exception from the
library.

Speech going out (:class:`AudioEncoder`) is encoded as it is made: each
sentence's PCM becomes the next piece of an mp3, ogg/opus, aac or flac stream,
so a client starts playing before the last sentence is synthesised.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from protocol.errors import BadRequest, TooLarge

__all__ = ["ENCODINGS", "AudioEncoder", "decode_audio", "wav_header"]


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


# -- encoding --------------------------------------------------------------------------

# response_format -> (container, codec, media type); every one streams as it is encoded.
ENCODINGS: dict[str, tuple[str, str, str]] = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"),
    "flac": ("flac", "flac", "audio/flac"),
}


class _Sink(io.RawIOBase):
    """Where the muxer writes: bytes are taken out as soon as they are written."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts = []
        return out


class AudioEncoder:
    """16-bit mono PCM in, a compressed stream out, piece by piece (FFmpeg through PyAV).

    ``encode`` returns what the muxer could write so far (possibly nothing yet:
    encoders buffer a frame or two), ``close`` the rest; concatenated, the
    pieces are one valid file of ``fmt``.
    """

    def __init__(self, fmt: str, rate: int) -> None:
        import av

        container, codec, self.media_type = ENCODINGS[fmt]
        self._rate = rate
        self._sink = _Sink()
        self._out: Any = av.open(self._sink, mode="w", format=container)
        self._stream: Any = self._out.add_stream(codec, rate=rate, layout="mono")
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        import av

        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = self._rate
            frame.pts = self._pts
            self._pts += samples.shape[1]
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._out.mux(packet)
        self._out.close()
        return self._sink.take()


def wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes at their maximum)."""
    import struct

    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )
