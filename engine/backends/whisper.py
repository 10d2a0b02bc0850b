"""Speech recognition: Whisper models in CTranslate2's layout, run by faster-whisper.

A model folder holds ``model.bin`` (the CTranslate2 weights), ``config.json``
(Whisper's token ids: ``suppress_ids``, ``lang_ids``, ``alignment_heads``)
and the tokenizer (``tokenizer.json``, or ``vocabulary.*``); see
:mod:`engine.backends.whisper_entry`. Weights are loaded as int8 on CPU,
whatever they are stored as (faster-whisper converts them once at load).

A transcription is a job of the worker (:mod:`engine.jobs`): its first step
decodes the upload (:func:`engine.audio.decode_audio`, bounded by
``max_audio_seconds``), each later step yields the next segment, and
faster-whisper decodes a 30-second window when the segments of the previous
one are used up. So a running text stream beside it waits at most one window
(~0.1-0.3 s for tiny on two cores) per token. Segments are final when sent:
nothing already given is revised.

Live audio (``TranscribeOptions.live``, what WebSocket listen streams send:
an utterance of a few seconds, transcribed again and again while it grows)
takes a shorter path. Whisper reads 30-second windows, and faster-whisper
pads every clip to one: for tiny on two cores the encoder then takes ~430 ms
whatever the clip, most of the time to a final transcript. Here the encoder
reads only the clip's frames and a second of silence after them (the
model's audio context cut to fit), and
the decoder runs greedily without timestamps: a 2-second utterance is
transcribed in ~110 ms instead of ~520 ms, with the same words on the
project's test speech.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_ctranslate2_storage

from engine.audio import decode_audio
from engine.backends.base import LoadParams, TranscribeJob, Transcriber
from engine.backends.whisper_entry import check_whisper_folder
from engine.requests import TranscribeOptions, TranscriptSegment, Word
from protocol.errors import BadRequest, ModelLoadError

__all__ = ["MAX_AUDIO_SECONDS", "WhisperBackend"]

SAMPLE_RATE = 16000  # what every Whisper model reads
_WINDOW_FRAMES = 3000  # a 30-second window of 10 ms feature frames
_LIVE_PAD_FRAMES = 100  # the silence read after a live clip
_MAX_TOKENS = 224  # a window's text (half of Whisper's 448 positions)
MAX_AUDIO_SECONDS = 2 * 3600.0  # one request's longest audio (see engine.audio)


class WhisperBackend(Transcriber):
    name = "whisper"
    sample_rate = SAMPLE_RATE

    def __init__(self, model: WhisperModel, n_ctx: int, max_seconds: float) -> None:
        self._model = model
        self.n_ctx = n_ctx
        self._max_seconds = max_seconds
        self.multilingual = bool(model.model.is_multilingual)

    @classmethod
    def load(cls, path: str, params: LoadParams) -> WhisperBackend:
        folder = check_whisper_folder(path)
        try:
            model = WhisperModel(
                str(folder),
                device="cpu",
                compute_type="int8",
                cpu_threads=params.n_threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(
                path, "backend", f"CTranslate2 could not load it ({exc})"
            ) from None
        n_ctx = int(model.model.max_length) if hasattr(model.model, "max_length") else 448
        return cls(model, n_ctx, MAX_AUDIO_SECONDS)

    def free(self) -> None:
        self._model = None  # CTranslate2 frees with the object

    def transcribe_job(self, audio: bytes, options: TranscribeOptions) -> TranscribeJob:
        if options.task == "translate" and not self.multilingual:
            raise BadRequest("this model is English-only: it cannot translate")
        if options.language is not None and not self.multilingual and options.language != "en":
            raise BadRequest(
                f"this model is English-only: it cannot transcribe {options.language!r}"
            )
        if not 0.0 <= options.temperature <= 1.0:
            raise BadRequest("temperature must be within 0..1")
        return self._job(audio, options)

    def _job(self, audio: bytes, options: TranscribeOptions) -> TranscribeJob:
        samples = decode_audio(audio, rate=SAMPLE_RATE, max_seconds=self._max_seconds)
        yield []  # the decoding was this step's work
        if options.live and len(samples) <= SAMPLE_RATE * 30:
            encoded = self._encode_live(samples)
            yield []  # encoding was this step's work, decoding is the next one's
            text, language = self._live(encoded, samples, options)
            duration = len(samples) / SAMPLE_RATE
            if text.strip():
                yield [TranscriptSegment(id=0, start=0.0, end=_t(duration), text=text)]
            return language, duration
        segments, info = self._model.transcribe(
            samples,
            language=options.language if self.multilingual else "en",
            task=options.task,
            temperature=options.temperature,
            initial_prompt=options.prompt or None,
            word_timestamps=options.word_timestamps,
            beam_size=1 if options.temperature > 0 else 5,
            condition_on_previous_text=True,
        )
        for n, seg in enumerate(segments):
            # (faster-whisper gives numpy floats where it aligns words: plain floats here.)
            words = (
                [
                    Word(_t(w.start), _t(w.end), str(w.word), round(float(w.probability), 4))
                    for w in seg.words
                ]
                if seg.words
                else None
            )
            yield [
                TranscriptSegment(
                    id=n,
                    start=_t(seg.start),
                    end=_t(seg.end),
                    text=str(seg.text),
                    avg_logprob=float(seg.avg_logprob),
                    no_speech_prob=float(seg.no_speech_prob),
                    words=words,
                )
            ]
        return str(info.language), float(info.duration)

    def _encode_live(self, samples: np.ndarray) -> Any:
        """A clip of up to 30 s through the encoder, its audio context cut to fit."""
        model = self._model
        features = model.feature_extractor(samples)
        frames = min(_WINDOW_FRAMES, -(-(features.shape[-1] + _LIVE_PAD_FRAMES) // 100) * 100)
        features = features[:, :frames]
        if features.shape[-1] < frames:
            features = np.pad(features, ((0, 0), (0, frames - features.shape[-1])))
        return model.model.encode(get_ctranslate2_storage(features[None]))

    def _live(
        self, encoded: Any, samples: np.ndarray, options: TranscribeOptions
    ) -> tuple[str, str]:
        """The text of an encoded clip: greedy, no timestamps (see the module)."""
        model = self._model
        language = options.language or "en"
        if self.multilingual and options.language is None:
            # The likeliest language token, "<|xx|>".
            language = str(model.model.detect_language(encoded)[0][0][0])[2:-2]
        elif not self.multilingual:
            language = "en"
        tokenizer = Tokenizer(
            model.hf_tokenizer, self.multilingual, task=options.task, language=language
        )
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        if options.prompt:
            earlier = tokenizer.encode(" " + options.prompt.strip())[-(_MAX_TOKENS // 2 - 1) :]
            prompt = [tokenizer.sot_prev, *earlier, *prompt]
        result = model.model.generate(
            encoded,
            [prompt],
            beam_size=1,
            # Speech runs at most ~7 tokens a second: a cap on top of that stops the
            # loops greedy decoding falls into on a clip that ends mid-word.
            max_length=min(_MAX_TOKENS, 10 + int(8 * len(samples) / SAMPLE_RATE)),
            no_repeat_ngram_size=4,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        ids = [t for t in result[0].sequences_ids[0] if t < tokenizer.eot]
        return without_loop(str(tokenizer.decode(ids))), language


def without_loop(text: str, run: int = 4) -> str:
    """``text`` cut where it starts over: a clip's greedy decode that reaches the end of the
    speech may begin it again ("Green apples sit. Green apples sit on"). Someone who
    repeats their first ``run`` words within one utterance is rare enough to lose."""
    words = text.split()
    keys = [w.strip(".,!?;:'\"").lower() for w in words]
    for k in range(run, len(words) - run + 1):
        if keys[k : k + run] == keys[:run]:
            return " " + " ".join(words[:k])
    return text


def _t(seconds: float) -> float:
    return round(float(seconds), 3)
