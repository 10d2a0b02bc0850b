"""Manifests: what a model name points at, stored as one JSON document per ``name:tag``.

A manifest lists the model's files as content-addressed blobs (a GGUF model
has one; an ONNX model is a folder of several) together with everything a
Modelfile can add: default parameters, a chat template, a system prompt,
seed messages, licences, and where the model came from. Its own sha256 is the
model's id, so two names that point at identical manifests share an id.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

__all__ = [
    "FORMATS",
    "Format",
    "Layer",
    "Manifest",
    "ManifestMessage",
    "ParamValue",
    "decode_manifest",
    "encode_manifest",
    "manifest_digest",
]

# A GGUF file; folders: an ONNX model, a Whisper model (CTranslate2), a hibari voice,
# a voice-activity model (Silero VAD, which the gateway runs itself).
Format = Literal["gguf", "onnx", "whisper", "hibari", "vad"]
FORMATS: tuple[Format, ...] = ("gguf", "onnx", "whisper", "hibari", "vad")
ParamValue = int | float | str | bool | list[str]
SCHEMA_VERSION = 1


class Layer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digest: str  # "sha256:<64 hex>"
    size: int
    path: str  # file name inside the model ("model.gguf", "onnx/model.onnx")


class ManifestMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str


class Manifest(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    schema_version: int = SCHEMA_VERSION
    format: Format
    files: list[Layer]
    parameters: dict[str, ParamValue] = msgspec.field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[ManifestMessage] = msgspec.field(default_factory=list)
    license: list[str] = msgspec.field(default_factory=list)
    parent: str | None = None  # the model this one was created FROM
    source: str | None = None  # where its bytes were pulled or imported from
    created_at: float = 0.0
    # LoRA adapters (GGUF) applied over the model's weights, in order (Modelfile ADAPTER).
    adapters: list[Layer] = msgspec.field(default_factory=list)

    @property
    def layers(self) -> list[Layer]:
        """Every blob the model needs: its files, then its adapters."""
        return [*self.files, *self.adapters]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.layers)


_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Manifest)


def encode_manifest(m: Manifest) -> bytes:
    return _encoder.encode(m)


def decode_manifest(data: bytes) -> Manifest:
    """Decode and check a manifest; raise ``msgspec.ValidationError`` / ``DecodeError``."""
    m = _decoder.decode(data)
    if m.schema_version != SCHEMA_VERSION:
        raise msgspec.ValidationError(f"unsupported manifest schema {m.schema_version}")
    if not m.files:
        raise msgspec.ValidationError("a manifest lists no files")
    for f in m.layers:
        algo, _, hexdigest = f.digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or f.size < 0:
            raise msgspec.ValidationError(f"bad layer {f.digest!r}")
        if f.path.startswith("/") or ".." in f.path.split("/"):
            raise msgspec.ValidationError(f"bad file path {f.path!r}")
    return m


def manifest_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
