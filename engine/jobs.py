"""Jobs: the requests of every model kind that are not token-by-token text generation.

Text generation is stepped in batches by the worker's decode loop. Every
other kind of request (embeddings, transcription, speech synthesis) is a
*job*: a request message, a backend interface that turns it into bounded units
of work, and the replies it sends. The worker runs all jobs through one loop
(:class:`JobQueue`): after the decode step, units of the most urgent job (then the
oldest) for a slice of the cycle, so running streams wait at most about one unit
per token whatever the kind.

A kind is added by one :class:`JobKind` in :data:`JOB_KINDS`: which message
starts it, and how a loaded backend makes a :class:`Job` of it (refusing at
once, with a typed error, a model that cannot serve it or inputs it cannot
take). Nothing else in the worker changes.
"""

from __future__ import annotations

import abc
import time
from array import array
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import msgspec

from engine import ipc
from engine.backends.base import (
    Backend,
    ClassifyJob,
    EmbedJob,
    ImagesJob,
    LiveBatches,
    SynthesizeJob,
    TranscribeJob,
    classifier_of,
    embedder_of,
    image_embedder_of,
    image_generator_of,
    synthesizer_of,
    transcriber_of,
)
from engine.requests import TranscriptSegment
from protocol.errors import ErrorCode, FerrousError, ModelNotFound, TooLarge

__all__ = ["JOB_KINDS", "JOB_SLICE_S", "Job", "JobKind", "JobQueue", "error_reply"]

MAX_BATCH = 8  # jobs whose units run together (live clips)

# Seconds of job units one worker loop runs before the next generation step. Units
# are bounded on their own (an encoder pass, a sentence, a decode); the slice only
# lets the cheap ones around them ride along, at a few ms of inter-token latency.
JOB_SLICE_S = 0.010


def error_reply(req: int, exc: BaseException) -> ipc.WorkerError:
    """The typed error a job (or its start) ends with."""
    if isinstance(exc, FerrousError):
        return ipc.WorkerError(
            req=req, code=exc.code.value, message=exc.message, retryable=exc.retryable
        )
    return ipc.WorkerError(
        req=req,
        code=ErrorCode.ENGINE_ERROR.value,
        message=f"{type(exc).__name__}: {exc}",
        retryable=False,
    )


class Job(abc.ABC):
    """One request of a job kind, run one bounded unit at a time."""

    def __init__(self, req: int, model: str, priority: int = 0) -> None:
        self.req = req
        self.model = model
        self.priority = priority

    @abc.abstractmethod
    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        """Run one unit: the messages to send now (partial results, or the reply), and
        whether the job is done. An exception ends it with that error."""

    def close(self) -> None:  # noqa: B027 (most jobs hold nothing to release)
        """Drop the job unfinished (its model was unloaded, the worker is stopping)."""

    def batch_key(self) -> Hashable | None:
        """Jobs whose keys are equal (not None) run their next unit together, through
        :meth:`step_together` of their class."""
        return None

    @classmethod
    def step_together(cls, jobs: list[Job]) -> list[tuple[list[ipc.FromWorker], bool]]:
        """One unit of each of ``jobs`` (all of this class, with equal keys) at once."""
        return [job.step() for job in jobs]


@dataclass(frozen=True)
class JobKind:
    """A kind of job: the message that starts one, and how a backend makes the job."""

    message: type[msgspec.Struct]
    start: Callable[[Backend, Any], Job]


class _Embedding(Job):
    """Embeddings: one forward pass per unit; the vectors as raw float32 in the reply."""

    def __init__(self, msg: ipc.Embed, run: EmbedJob) -> None:
        super().__init__(msg.req, msg.model)
        self._run = run

    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        try:
            next(self._run)
            return [], False
        except StopIteration as done:
            vectors, n_tokens = done.value
        dim = len(vectors[0]) if vectors else 0
        data = array("f", chain.from_iterable(vectors)).tobytes()
        if len(data) > ipc.MAX_FRAME - 1024:
            raise TooLarge(
                f"{len(vectors)} vectors of {dim} floats exceed one reply; send fewer inputs"
            )
        return [ipc.Embedded(req=self.req, dim=dim, data=data, prompt_tokens=n_tokens)], True

    def close(self) -> None:
        self._run.close()


def _start_embedding(backend: Backend, msg: ipc.Embed) -> Job:
    # A runtime that cannot embed, or bad inputs, fail here, at once.
    texts = embedder_of(backend).embed_job(msg.inputs, msg.truncate) if msg.inputs else None
    if not msg.images:
        assert texts is not None
        return _Embedding(msg, texts)
    images = image_embedder_of(backend).embed_images_job(msg.images)
    return _Embedding(msg, _texts_then_images(texts, images))


def _texts_then_images(texts: EmbedJob | None, images: EmbedJob) -> EmbedJob:
    """One job of both parts: the texts' vectors, then the images'."""
    text_vectors, tokens = (yield from texts) if texts is not None else ([], 0)
    image_vectors, _ = yield from images
    return text_vectors + image_vectors, tokens


class _Transcription(Job):
    """Speech to text: the upload decoded, then a segment per unit, each sent as it comes."""

    def __init__(self, msg: ipc.Transcribe, run: TranscribeJob) -> None:
        super().__init__(msg.req, msg.model)
        self._run = run

    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        try:
            segments = next(self._run)
        except StopIteration as done:
            language, duration = done.value
            return [ipc.Transcribed(req=self.req, language=language, duration=duration)], True
        if not segments:
            return [], False
        return [ipc.TranscriptPart(req=self.req, segments=segments)], False

    def close(self) -> None:
        self._run.close()


class _LiveTranscription(Job):
    """A live clip (a listen stream's utterance): encoded, then decoded, each unit with the
    other live clips of the same model and priority queued at the same stage
    (:class:`~engine.backends.base.LiveBatches`)."""

    def __init__(self, msg: ipc.Transcribe, batches: LiveBatches, clip: Any) -> None:
        super().__init__(msg.req, msg.model)
        self._batches = batches
        self._clip = clip
        self._stage = "encode"

    def batch_key(self) -> Hashable:
        return (id(self._batches), self.priority, *self._batches.clip_key(self._clip, self._stage))

    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        return self.step_together([self])[0]

    @classmethod
    def step_together(cls, jobs: list[Job]) -> list[tuple[list[ipc.FromWorker], bool]]:
        live = [j for j in jobs if isinstance(j, _LiveTranscription)]
        batches, stage = live[0]._batches, live[0]._stage
        if stage == "encode":
            batches.encode_clips([j._clip for j in live])
            for j in live:
                j._stage = "decode"
            return [([], False) for _ in live]
        out: list[tuple[list[ipc.FromWorker], bool]] = []
        for j, (text, language, seconds) in zip(
            live, batches.decode_clips([j._clip for j in live]), strict=True
        ):
            replies: list[ipc.FromWorker] = []
            if text.strip():
                segment = TranscriptSegment(id=0, start=0.0, end=round(seconds, 3), text=text)
                replies.append(ipc.TranscriptPart(req=j.req, segments=[segment]))
            replies.append(ipc.Transcribed(req=j.req, language=language, duration=seconds))
            out.append((replies, True))
        return out


def _start_transcription(backend: Backend, msg: ipc.Transcribe) -> Job:
    transcriber = transcriber_of(backend)
    if msg.options.live and isinstance(transcriber, LiveBatches):
        # Read now: queued clips are then all at one stage, and go through it together.
        clip = transcriber.live_clip(msg.audio, msg.options)
        if clip is not None:
            return _LiveTranscription(msg, transcriber, clip)
    return _Transcription(msg, transcriber.transcribe_job(msg.audio, msg.options))


class _Synthesis(Job):
    """Text to speech: a sentence per unit, its PCM sent as soon as it is made."""

    def __init__(self, msg: ipc.Synthesize, run: SynthesizeJob, sample_rate: int) -> None:
        super().__init__(msg.req, msg.model)
        self._run = run
        self._rate = sample_rate

    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        try:
            pcm = next(self._run)
        except StopIteration as done:
            return [
                ipc.Synthesized(req=self.req, seconds=float(done.value), sample_rate=self._rate)
            ], True
        return ([ipc.AudioPart(req=self.req, pcm=pcm, rate=self._rate)] if pcm else []), False

    def close(self) -> None:
        self._run.close()


def _start_synthesis(backend: Backend, msg: ipc.Synthesize) -> Job:
    voice = synthesizer_of(backend)
    return _Synthesis(msg, voice.synthesize_job(msg.text, msg.options), voice.sample_rate)


class _Classification(Job):
    """Images to labels: the images read in one unit, then a batch through the graph per unit."""

    def __init__(self, msg: ipc.Classify, run: ClassifyJob) -> None:
        super().__init__(msg.req, msg.model)
        self._run = run

    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        try:
            next(self._run)
        except StopIteration as done:
            return [ipc.Classified(req=self.req, labels=done.value)], True
        return [], False

    def close(self) -> None:
        self._run.close()


def _start_classification(backend: Backend, msg: ipc.Classify) -> Job:
    return _Classification(msg, classifier_of(backend).classify_job(msg.images, msg.top_k))


class _Images(Job):
    """A prompt to images: a sampler step per unit (its progress sent), the files at the end."""

    def __init__(self, msg: ipc.MakeImages, run: ImagesJob) -> None:
        super().__init__(msg.req, msg.model)
        self._run = run

    def step(self) -> tuple[list[ipc.FromWorker], bool]:
        try:
            step, steps = next(self._run)
        except StopIteration as done:
            images, seed = done.value
            return [ipc.ImagesMade(req=self.req, images=images, seed=seed)], True
        return [ipc.ImagesStep(req=self.req, step=step, steps=steps)], False

    def close(self) -> None:
        self._run.close()


def _start_images(backend: Backend, msg: ipc.MakeImages) -> Job:
    return _Images(msg, image_generator_of(backend).images_job(msg.prompt, msg.options))


JOB_KINDS: tuple[JobKind, ...] = (
    JobKind(ipc.Embed, _start_embedding),
    JobKind(ipc.Transcribe, _start_transcription),
    JobKind(ipc.Synthesize, _start_synthesis),
    JobKind(ipc.Classify, _start_classification),
    JobKind(ipc.MakeImages, _start_images),
)


class JobQueue:
    """The worker's jobs of every kind, by priority then oldest first, a slice of units
    per :meth:`step`."""

    def __init__(
        self, send: Callable[[ipc.FromWorker], None], send_raw: Callable[[bytes], None]
    ) -> None:
        self._send = send
        self._send_raw = send_raw
        self._jobs: deque[Job] = deque()
        self._kinds = {k.message: k for k in JOB_KINDS}

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def handles(self) -> list[type[msgspec.Struct]]:
        """The message types that start a job."""
        return list(self._kinds)

    def start(self, msg: msgspec.Struct, backend: Backend | None, req: int, model: str) -> None:
        """Queue the job ``msg`` asks for, or answer at once with why it cannot run."""
        try:
            if backend is None:
                raise ModelNotFound(f"model {model!r} is not loaded")
            job = self._kinds[type(msg)].start(backend, msg)
        except Exception as exc:
            self._send(error_reply(req, exc))
            return
        job.priority = getattr(msg, "priority", 0)
        self._jobs.append(job)

    def step(self) -> None:
        """Units of the oldest job of the highest priority, its messages sent and it retired
        when done, until the jobs have had :data:`JOB_SLICE_S` of this loop (at least one
        unit). A live transcript's final decode goes before the partial decodes queued
        ahead of it: someone waits for an answer on it. The slice folds a job's cheap
        units (reading the text, closing with its summary) into the loop that runs its
        expensive one, so each does not cost a whole generation step of waiting."""
        start = time.perf_counter()
        while self._jobs:
            job = max(self._jobs, key=lambda j: j.priority)  # the first of the highest
            group = [job]
            # Everything a backend's code decides (batch keys, units, how many results)
            # is inside the try: a fault there ends those jobs, never the worker.
            try:
                key = job.batch_key()
                if key is not None:
                    same = [j for j in self._jobs if j is not job and type(j) is type(job)]
                    group = [job, *(j for j in same if j.batch_key() == key)][:MAX_BATCH]
                results = type(job).step_together(group) if len(group) > 1 else [job.step()]
                if len(results) != len(group):
                    raise RuntimeError(f"{len(results)} results for {len(group)} jobs")
            except Exception as exc:
                results = [([error_reply(j.req, exc)], True) for j in group]
            for j, (out, done) in zip(group, results, strict=True):
                self._finish_unit(j, out, done)
            if time.perf_counter() - start >= JOB_SLICE_S:
                return

    def _finish_unit(self, job: Job, out: list[ipc.FromWorker], done: bool) -> None:
        if done:
            self._jobs.remove(job)
        try:
            encoded = [ipc.encode(msg) for msg in out]
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            # A backend that hands over something that is not a plain value ends its
            # job with an error; the worker and every other request go on.
            if not done:
                self._jobs.remove(job)
                job.close()
            self._send(error_reply(job.req, exc))
            return
        for data in encoded:
            self._send_raw(data)

    def cancel(self, req: int) -> None:
        """Drop job ``req`` unfinished, without a reply: its caller is gone."""
        for job in [j for j in self._jobs if j.req == req]:
            self._jobs.remove(job)
            job.close()

    def drop_model(self, model: str) -> None:
        """End every job of ``model`` (unloaded under it) with ``model_not_found``."""
        for job in [j for j in self._jobs if j.model == model]:
            self._jobs.remove(job)
            job.close()
            gone = ModelNotFound(f"model {model!r} was unloaded during the request")
            self._send(error_reply(job.req, gone))

    def close(self) -> None:
        for job in self._jobs:
            job.close()
        self._jobs.clear()
