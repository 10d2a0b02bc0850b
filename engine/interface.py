"""The engine as the gateway sees it: a small protocol, not the worker pool.

The gateway's surfaces load and unload models, stream generations and other
jobs, cancel them and ask for health; nothing more. They are typed against
:class:`Engine`, this protocol, rather than against
:class:`engine.client.EngineClient`, which also holds the worker processes,
the watchdog, residency and placement. Only the server's composition root
builds the concrete client, so an engine made otherwise (workers on other
machines behind shared state, a different pool) fits the same seam.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from engine.requests import (
    Classification,
    Embeddings,
    GenerateRequest,
    GenerationDone,
    ImageOptions,
    Images,
    ImageStep,
    Speech,
    SpeechChunk,
    SpeechOptions,
    TokenDelta,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
)

if TYPE_CHECKING:
    from engine.residency import LoadedModel, ModelInfo

__all__ = ["Engine", "EngineHealth", "StartCallback", "WaitCallback", "WorkerHealth"]

# Awaited with (requests ahead, estimated seconds or None) while a request waits.
WaitCallback = Callable[[int, float | None], Awaitable[None]]
# Awaited once a waiting request has a sequence slot.
StartCallback = Callable[[], Awaitable[None]]


class WorkerHealth(msgspec.Struct, frozen=True):
    """One worker's answer to a health ping (or what is known of a dead one)."""

    index: int
    pid: int
    alive: bool
    models: list[str]
    active: int
    queued: int
    rss_bytes: int
    tokens_generated: int
    where: str = "local"  # a child process here, or where a host placed it ("ray:<node>")
    tokens_read_ahead: int = 0  # finished chats' next turn markers read while idle


class EngineHealth(msgspec.Struct, frozen=True):
    """Every worker's health, and how many times workers were replaced."""

    ok: bool
    workers: list[WorkerHealth]
    restarts: int


class Engine(Protocol):
    """What the gateway may ask of the engine (see the module docstring)."""

    async def load(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        backend: str = "",
        n_ctx: int = 0,
        chat_template: str | None = None,
        keep_alive: float | None = None,
    ) -> ModelInfo:
        """Load a model file under ``name`` (kept while used, then for ``keep_alive``)."""
        ...

    async def unload(self, name: str) -> None:
        """Unload a model; its running generations end as cancelled."""
        ...

    def models(self) -> list[str]:
        """The names of the models loaded."""
        ...

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, most recently used first."""
        ...

    def set_keep_alive(self, name: str, keep_alive: float) -> None:
        """How long ``name`` stays loaded once idle (0 unloads it when idle)."""
        ...

    async def health(self) -> EngineHealth:
        """Every worker's state, asked of it now."""
        ...

    def generate(
        self,
        request: GenerateRequest,
        *,
        on_wait: WaitCallback | None = None,
        on_start: StartCallback | None = None,
    ) -> AsyncGenerator[TokenDelta | GenerationDone, None]:
        """Token deltas, then one :class:`GenerationDone`; closing it early cancels."""
        ...

    async def cancel(self, request_id: str) -> bool:
        """Cancel a waiting or running generation; False when there is none."""
        ...

    async def embed(
        self,
        model: str,
        inputs: list[str],
        *,
        truncate: bool = True,
        keep_alive: float | None = None,
        images: Sequence[bytes] = (),
    ) -> Embeddings:
        """Unit-length embedding vectors of ``inputs``, in input order."""
        ...

    async def classify(
        self,
        model: str,
        images: list[bytes],
        *,
        top_k: int = 5,
        keep_alive: float | None = None,
    ) -> Classification:
        """Each image's ``top_k`` labels, likeliest first."""
        ...

    def transcribe_stream(
        self,
        model: str,
        audio: bytes,
        options: TranscribeOptions | None = None,
        *,
        keep_alive: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[TranscriptSegment | Transcript, None]:
        """Each transcript segment as it is decoded, then the whole transcript."""
        ...

    def synthesize_stream(
        self,
        model: str,
        text: str,
        options: SpeechOptions | None = None,
        *,
        keep_alive: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[SpeechChunk | Speech, None]:
        """Speech a sentence at a time, then the whole of it."""
        ...

    def generate_images_stream(
        self,
        model: str,
        prompt: str,
        options: ImageOptions | None = None,
        *,
        keep_alive: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[ImageStep | Images, None]:
        """A step of each image at a time, then the images."""
        ...
