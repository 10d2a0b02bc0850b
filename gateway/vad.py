"""Voice-activity detection with Silero VAD (ONNX), and client audio brought to 16 kHz.

The gateway runs this model itself rather than in an engine worker: it is
1-2 MB and reads a 32 ms window in about a tenth of a millisecond, less than
one round trip to a worker would cost, and each listening stream needs an
answer per window to know when its speaker stops. One onnxruntime session
(one thread) serves every stream; a stream's own state is its recurrent
state and the last 64 samples before its next window, as the model expects.

:class:`Resampler` turns the client's 16-bit PCM at its declared rate into
float samples at 16 kHz (PyAV's resampler, which keeps its filter state
between frames, so chunk borders leave no clicks).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import BadRequest, ModelNotFound

__all__ = ["RATE", "WINDOW", "Resampler", "VadModel", "VadStream"]

RATE = 16000  # the rate of the voice-activity and speech-recognition models
WINDOW = 512  # samples per probability (32 ms)
_CONTEXT = 64  # samples of the previous window the model reads before each one


class VadModel:
    """A loaded Silero VAD model; :meth:`stream` starts a stream's state."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        file = path / "silero_vad.onnx" if path.is_dir() else path
        if not file.is_file():
            raise ModelNotFound(f"no voice-activity model at {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()  # onnxruntime sessions run one call at a time here
        self._sr = np.array(RATE, dtype=np.int64)

    def stream(self) -> VadStream:
        return VadStream(self)

    def run(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        with self._lock:
            out, new_state = self._session.run(
                None, {"input": window[None, :], "state": state, "sr": self._sr}
            )
        return float(out[0][0]), new_state


class VadStream:
    """One audio stream's voice activity: a probability per 512-sample window."""

    def __init__(self, model: VadModel) -> None:
        self._model = model
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def feed(self, samples: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """Each window ``samples`` (16 kHz floats) completes, with its probability of speech."""
        pending = np.concatenate([self._pending, samples]) if self._pending.size else samples
        out = []
        n = len(pending) // WINDOW
        for i in range(n):
            window = pending[i * WINDOW : (i + 1) * WINDOW]
            p, self._state = self._model.run(np.concatenate([self._context, window]), self._state)
            self._context = window[-_CONTEXT:]
            out.append((p, window))
        self._pending = pending[n * WINDOW :].astype(np.float32, copy=True)
        return out


class Resampler:
    """16-bit mono PCM at ``rate`` to float samples at 16 kHz, chunk by chunk."""

    def __init__(self, rate: int) -> None:
        import av

        self.rate = rate
        self._frames = 0
        self._resampler: Any = None
        if rate != RATE:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        self._av = av

    def feed(self, pcm: bytes) -> np.ndarray:
        if len(pcm) % 2:
            raise BadRequest("16-bit PCM comes in whole samples: an odd number of bytes arrived")
        ints = np.frombuffer(pcm, dtype="<i2")
        if self._resampler is None:
            return ints.astype(np.float32) / 32768.0
        if not ints.size:
            return np.zeros(0, dtype=np.float32)
        frame = self._av.AudioFrame.from_ndarray(ints.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._frames
        self._frames += ints.size
        parts = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
