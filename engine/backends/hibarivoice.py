"""Speech synthesis with hibari voices (onnxruntime + the hibari phonemizer).

Text is split into sentences and phonemized by the ``hibari`` package (its
lexicons and out-of-vocabulary model ship in the wheel), each sentence runs
through the voice's ONNX model and hibari's vocoder, and the job yields it as
16-bit mono PCM at 24 kHz: a client hears the first sentence while the rest
is being made (the first ~2.5 s of audio is ready in tens of milliseconds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.backends.base import LoadParams, SynthesizeJob, Synthesizer
from engine.backends.tts_entry import read_voice
from engine.requests import SpeechOptions
from protocol.errors import BadRequest, ModelLoadError, TooLarge

__all__ = ["MAX_INPUT_CHARS", "MAX_SPEED", "MIN_SPEED", "HibariBackend", "build_voice"]

MAX_INPUT_CHARS = 4096  # one request's text (OpenAI's limit on /v1/audio/speech)
MIN_SPEED, MAX_SPEED = 0.5, 2.0  # the pace range the voices were trained for


def build_voice(path: str, threads: int) -> tuple[Any, dict[str, Any]]:
    """hibari's synthesiser on the folder's model, and the folder's voice.json."""
    from hibari import Hibari
    from hibari.g2p import G2P

    folder, meta = read_voice(path)
    try:
        tts = Hibari(
            model=str(folder / "voice.onnx"),
            threads=max(1, threads),
            g2p=G2P(british=bool(meta.get("british", False))),
        )
    except Exception as exc:  # onnxruntime raises its own Exception subclasses
        raise ModelLoadError(path, "backend", f"the voice could not be loaded ({exc})") from None
    return tts, meta


class HibariBackend(Synthesizer):
    name = "hibari"

    def __init__(self, tts: Any, voice: str) -> None:
        self._tts = tts
        self.voice = voice
        self.sample_rate = int(tts.sample_rate)
        self.n_ctx = MAX_INPUT_CHARS

    @classmethod
    def load(cls, path: str, params: LoadParams) -> HibariBackend:
        tts, meta = build_voice(path, params.n_threads)
        return cls(tts, str(meta.get("voice", "voice")))

    def free(self) -> None:
        self._tts = None

    def synthesize_job(self, text: str, options: SpeechOptions) -> SynthesizeJob:
        if not text.strip():
            raise BadRequest("the input is empty")
        if len(text) > MAX_INPUT_CHARS:
            raise TooLarge(
                f"the input has {len(text)} characters; one request takes {MAX_INPUT_CHARS}"
            )
        if not MIN_SPEED <= options.speed <= MAX_SPEED:
            raise BadRequest(f"speed must be within {MIN_SPEED}..{MAX_SPEED}")
        return self._job(text, options)

    def _job(self, text: str, options: SpeechOptions) -> SynthesizeJob:
        tts = self._tts
        sentences = tts.phonemize(text)
        yield b""  # phonemizing was this step's work
        rng = np.random.default_rng(options.seed)
        samples = 0
        for phonemes in sentences:
            audio = tts.from_ids(tts.ids(phonemes), options.speed, rng)
            samples += len(audio)
            yield (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        return samples / self.sample_rate
