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
"""

from __future__ import annotations

from faster_whisper import WhisperModel

from engine.audio import decode_audio
from engine.backends.base import LoadParams, TranscribeJob, Transcriber
from engine.backends.whisper_entry import check_whisper_folder
from engine.requests import TranscribeOptions, TranscriptSegment, Word
from protocol.errors import BadRequest, ModelLoadError

__all__ = ["MAX_AUDIO_SECONDS", "WhisperBackend"]

SAMPLE_RATE = 16000  # what every Whisper model reads
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


def _t(seconds: float) -> float:
    return round(float(seconds), 3)
