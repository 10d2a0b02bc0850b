"""Speech jobs as every surface runs them: the HTTP audio routes and WebSocket voice.

Like a generation (:mod:`gateway.generation`), a job is refused while the
server drains, resolves its model in the caller's view and loads it, is
registered so a shutdown cancels it, and records the speech metrics; the
surfaces only translate requests and results.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from engine import (
    Speech,
    SpeechChunk,
    SpeechOptions,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
)
from gateway.auth import Principal
from gateway.generation import tracked_work
from gateway.interface import Gateway

__all__ = ["synthesize", "transcribe"]


async def synthesize(
    gateway: Gateway,
    principal: Principal,
    model: str,
    text: str,
    options: SpeechOptions,
    *,
    priority: int = 0,
) -> AsyncGenerator[SpeechChunk | Speech, None]:
    """``text`` spoken by ``model``: a chunk of PCM a sentence, then :class:`Speech`."""
    with tracked_work(gateway):
        resolved = await gateway.ensure_model(principal, model)
        t0 = time.perf_counter()
        async for item in gateway.engine.synthesize_stream(
            resolved.key, text, options, priority=priority
        ):
            if isinstance(item, Speech):
                gateway.metrics.speech_seconds.labels(model).inc(item.seconds)
                gateway.metrics.job_seconds.labels("speech", model).observe(
                    time.perf_counter() - t0
                )
            yield item


async def transcribe(
    gateway: Gateway,
    principal: Principal,
    model: str,
    audio: bytes,
    options: TranscribeOptions,
    *,
    priority: int = 0,
) -> AsyncGenerator[TranscriptSegment | Transcript, None]:
    """Segments of ``audio``'s transcript as they are decoded, then the whole transcript.

    Like a generation: refused while the server drains, the model resolved in
    ``principal``'s view and loaded, and registered so a shutdown cancels it.
    """
    with tracked_work(gateway):
        resolved = await gateway.ensure_model(principal, model)
        t0 = time.perf_counter()
        async for item in gateway.engine.transcribe_stream(
            resolved.key, audio, options, priority=priority
        ):
            if isinstance(item, Transcript):
                item = Transcript(
                    text=item.text,
                    language=item.language,
                    duration=item.duration,
                    segments=item.segments,
                    model=model,
                )
                gateway.metrics.audio_seconds.labels(model).inc(item.duration)
                gateway.metrics.job_seconds.labels("transcribe", model).observe(
                    time.perf_counter() - t0
                )
            yield item
