"""What the engine knows about a backend before loading anything: its registry entry.

A model reaches a worker in three stages, and only the last needs the
backend's native library:

1. **find** — which backend takes this path (a GGUF file, a folder of ONNX
   files, ...): each entry :meth:`~BackendEntry.claims` a layout with a
   cheap look at names, never reading weights;
2. **inspect and size** — in the engine client, before any worker sees the
   file: :meth:`~BackendEntry.inspect` validates it (a typed
   :class:`~protocol.errors.ModelLoadError` for a bad one) and says which
   :class:`Kind` of jobs it serves; :meth:`~BackendEntry.size` says how many
   sequences each worker runs and how many bytes the model takes, for the
   memory budget;
3. **load** — in each worker, :meth:`~BackendEntry.backend_class` imports the
   backend module and its ``load`` builds the :class:`~engine.backends.base.Backend`.

Each backend also owns its options (``options``: a msgspec struct, or None):
they travel from the configuration to the worker encoded as bytes, so that
nothing between the two names them. A new kind of model is a new entry and a
new backend module (:mod:`engine.backends.registry` lists the entries), not a
branch in the engine client or the worker.
"""

from __future__ import annotations

import abc
import enum
import importlib
import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import msgspec

from engine.backends.base import Backend
from engine.gguf_header import GGUFHeader
from protocol.errors import BadRequest

__all__ = ["BackendEntry", "Found", "Kind", "Sizing", "SizingInputs"]


class Kind(enum.StrEnum):
    """A kind of job a model serves; each is one interface of :mod:`engine.backends.base`."""

    TEXT = "text"  # TextGenerator: sequences stepped a token at a time
    EMBED = "embed"  # Embedder: vectors for inputs, a job of bounded steps
    ASR = "asr"  # Transcriber: speech to timed text, a job of one window per step
    TTS = "tts"  # Synthesizer: text to speech, a job of one sentence per step
    IMAGE_CLASSIFY = "image-classify"  # ImageClassifier: images to labels, a batch per step
    IMAGE_EMBED = "image-embed"  # ImageEmbedder: images and texts to vectors in one space
    IMAGE_GENERATE = "image-generate"  # ImageGenerator: a prompt to images, a sampler step per step


@dataclass(frozen=True)
class Found:
    """What :meth:`BackendEntry.inspect` found at a path."""

    path: str
    backend: str  # the entry's public name, as ``ps`` shows it
    kinds: frozenset[Kind]
    header: GGUFHeader | None = None  # GGUF files: their metadata, read once


@dataclass(frozen=True)
class SizingInputs:
    """What sizing a model depends on besides the model itself."""

    n_ctx: int  # requested context per sequence; 0 = the model's own, capped
    workers: int
    threads: int  # per worker
    seqs_cap: int  # a configured cap on sequences per worker; 0 = chosen
    memory_budget: int
    n_batch: int
    kv_unified: bool
    options: msgspec.Struct | None  # this backend's options (its entry's ``options`` type)


@dataclass(frozen=True)
class Sizing:
    n_seq: int  # sequences each worker runs at once
    size: int  # estimated bytes in all workers (see engine.memory)


class BackendEntry(abc.ABC):
    """One backend in the registry: its layout, checks, sizing and options."""

    name: ClassVar[str]
    """Public name: the ``backend`` a request or a Modelfile may ask for."""
    package: ClassVar[str]
    """The Python package the backend needs (checked without importing it)."""
    install: ClassVar[str] = ""
    """What to install when it is missing (default: the package itself)."""
    module: ClassVar[str]
    cls: ClassVar[str]
    options: ClassVar[type[msgspec.Struct] | None] = None
    default: ClassVar[bool] = True
    """Whether it may be chosen when no backend is asked for (else only by name)."""
    kinds: ClassVar[frozenset[Kind]] = frozenset()
    """The kinds of jobs the models it takes serve (``ferrous backends`` lists them)."""
    layout: ClassVar[str] = ""
    """The file layout it claims, in a few words (``ferrous backends``)."""

    @abc.abstractmethod
    def claims(self, path: str) -> bool:
        """Whether ``path`` has this backend's layout; cheap (names, not contents)."""

    @abc.abstractmethod
    def inspect(self, path: str) -> Found:
        """Validate ``path`` without loading it; raise ModelLoadError for a bad one."""

    @abc.abstractmethod
    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        """Sequences per worker and estimated bytes of the model in all workers."""

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def backend_class(self) -> type[Backend]:
        if not self.installed():
            hint = self.install or self.package
            raise BadRequest(f"backend {self.name!r} is not installed (pip install {hint})")
        found: type[Backend] = getattr(importlib.import_module(self.module), self.cls)
        return found

    def options_of(self, configured: dict[str, msgspec.Struct]) -> msgspec.Struct | None:
        """This backend's options from the configured ones (by backend name), or its defaults."""
        if self.options is None:
            return None
        mine = configured.get(self.name)
        return mine if isinstance(mine, self.options) else self.options()

    def encode_options(self, options: msgspec.Struct | None) -> bytes:
        return b"" if options is None else msgspec.msgpack.encode(options)

    def decode_options(self, data: bytes) -> msgspec.Struct | None:
        if self.options is None:
            return None
        if not data:
            return self.options()
        return msgspec.msgpack.decode(data, type=self.options)
