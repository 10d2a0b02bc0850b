"""Protocol v1 image messages: ``draw`` an image with a generation model, ``image`` out.

``draw`` asks an image generation model for ``count`` images of ``prompt``: the
server answers ``started``, a ``progress`` per sampler step (``status``
``"denoising"``, ``completed`` of ``total`` steps), an ``image`` per picture
(PNG bytes, counted against flow-control credits like text), then ``done``.
``cancel`` stops it between steps. See docs/protocol.md, "Images".
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from .fields import GenerationId, ModelName, _ClientBase, _ServerBase

__all__ = ["Draw", "ImageOut"]


class Draw(_ClientBase, tag="draw"):
    """Generate ``count`` images of ``prompt`` with an image generation ``model``; ``width`` and
    ``height`` (0: the model's own size), ``steps`` (0: the model's default) and ``seed``
    (none: drawn, and reported on each image)."""

    id: GenerationId
    model: ModelName
    prompt: Annotated[str, Meta(max_length=4000)] = ""
    count: Annotated[int, Meta(ge=1, le=16)] = 1
    width: Annotated[int, Meta(ge=0, le=8192)] = 0
    height: Annotated[int, Meta(ge=0, le=8192)] = 0
    steps: Annotated[int, Meta(ge=0, le=1000)] = 0
    seed: Annotated[int, Meta(ge=0, lt=2**32)] | None = None


class ImageOut(_ServerBase, tag="image"):
    """Image ``index`` of generation ``id``: a PNG file; ``seed`` makes the same images again."""

    id: str
    index: int
    data: bytes
    seed: int
    format: str = "png"
    n: int | None = None  # the message's number in the session (resume)
