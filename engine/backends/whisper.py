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
project's test speech. Live clips are also taken in batches
(:class:`~engine.backends.base.LiveBatches`): the utterances of several
streams that end together go through one encoder pass and one decoding
when their clips are as long (in whole seconds, as they are cut), which for
four clips on two cores took about two thirds of the time of four passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_ctranslate2_storage

from engine.audio import decode_audio
from engine.backends.base import LiveBatches, LoadParams, TranscribeJob, Transcriber
from engine.backends.whisper_entry import check_whisper_folder
from engine.requests import TranscribeOptions, TranscriptSegment, Word
from protocol.errors import BadRequest, ModelLoadError, TooLarge

__all__ = ["MAX_AUDIO_SECONDS", "WhisperBackend"]

SAMPLE_RATE = 16000  # what every Whisper model reads
_WINDOW_FRAMES = 3000  # a 30-second window of 10 ms feature frames
_LIVE_PAD_FRAMES = 100  # the silence read after a live clip
_MAX_TOKENS = 224  # a window's text (half of Whisper's 448 positions)
MAX_AUDIO_SECONDS = 2 * 3600.0  # one request's longest audio (see engine.audio)


class WhisperBackend(Transcriber, LiveBatches):
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
            clip = self._clip(samples, options)
            self.encode_clips([clip])
            yield []  # encoding was this step's work, decoding is the next one's
            [(text, language, duration)] = self.decode_clips([clip])
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

    # -- live clips, in batches (engine.backends.base.LiveBatches) -------------------------

    def live_clip(self, audio: bytes, options: TranscribeOptions) -> _Clip | None:
        # Decoded no further than a window: a longer clip is decoded (whole) by the
        # ordinary transcription instead, not twice over.
        try:
            samples = decode_audio(
                audio, rate=SAMPLE_RATE, max_seconds=min(30.0, self._max_seconds)
            )
        except TooLarge:
            return None
        return self._clip(samples, options)

    def _clip(self, samples: np.ndarray, options: TranscribeOptions) -> _Clip:
        """A clip's features: its frames and a second of silence after them, in whole seconds
        (the encoder's audio context is cut to fit; see the module)."""
        features = self._model.feature_extractor(samples)
        frames = min(_WINDOW_FRAMES, -(-(features.shape[-1] + _LIVE_PAD_FRAMES) // 100) * 100)
        features = features[:, :frames]
        if features.shape[-1] < frames:
            features = np.pad(features, ((0, 0), (0, frames - features.shape[-1])))
        return _Clip(samples, options, np.ascontiguousarray(features, np.float32))

    def clip_key(self, clip: Any, stage: str) -> tuple[Any, ...]:
        if stage == "encode":
            # Only clips of one length: padding a shorter one with more silence than it
            # has alone changed its words (measured: "apples" read as "apple").
            return (stage, clip.features.shape[-1])
        assert clip.encoded is not None
        return (stage, clip.encoded.shape, clip.options.language, clip.options.task)

    def encode_clips(self, clips: list[Any]) -> None:
        width = max(c.features.shape[-1] for c in clips)
        batch = np.stack(
            [np.pad(c.features, ((0, 0), (0, width - c.features.shape[-1]))) for c in clips]
        )
        encoded = np.asarray(self._model.model.encode(get_ctranslate2_storage(batch)))
        for clip, out in zip(clips, encoded, strict=True):
            clip.encoded = np.ascontiguousarray(out)

    def decode_clips(self, clips: list[Any]) -> list[tuple[str, str, float]]:
        """Greedy, without timestamps, every clip's prompt in one call (see the module)."""
        model = self._model
        encoded = get_ctranslate2_storage(np.stack([c.encoded for c in clips]))
        guess = self.multilingual and any(c.options.language is None for c in clips)
        detected = model.model.detect_language(encoded) if guess else None
        languages = []
        for i, clip in enumerate(clips):
            language = clip.options.language or "en"
            if detected is not None and clip.options.language is None:
                language = str(detected[i][0][0])[2:-2]  # the likeliest token, "<|xx|>"
            elif not self.multilingual:
                language = "en"
            languages.append(language)
        prompts = []
        tokenizers = []
        for clip, language in zip(clips, languages, strict=True):
            tokenizer = Tokenizer(
                model.hf_tokenizer, self.multilingual, task=clip.options.task, language=language
            )
            prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
            if clip.options.prompt:
                earlier = tokenizer.encode(" " + clip.options.prompt.strip())[
                    -(_MAX_TOKENS // 2 - 1) :
                ]
                prompt = [tokenizer.sot_prev, *earlier, *prompt]
            prompts.append(prompt)
            tokenizers.append(tokenizer)
        longest = max(len(c.samples) for c in clips) / SAMPLE_RATE
        results = model.model.generate(
            encoded,
            prompts,
            beam_size=1,
            # Speech runs at most ~7 tokens a second: a cap on top of that stops the
            # loops greedy decoding falls into on a clip that ends mid-word.
            max_length=min(_MAX_TOKENS, 10 + int(8 * longest)),
            no_repeat_ngram_size=4,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        out = []
        for clip, tokenizer, language, result in zip(
            clips, tokenizers, languages, results, strict=True
        ):
            ids = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
            text = without_loop(str(tokenizer.decode(ids)))
            out.append((text, language, len(clip.samples) / SAMPLE_RATE))
        return out


@dataclass
class _Clip:
    samples: np.ndarray
    options: TranscribeOptions
    features: np.ndarray
    encoded: np.ndarray | None = None


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
