"""The image routes: ``POST /v1/classify`` (native) and ``/v1/images/generations`` (OpenAI).

A request is JSON: ``model`` (an image classification model), ``images`` (each
base64 or a ``data:image/...;base64,`` URL: PNG, JPEG, WebP, GIF, BMP), and
optionally ``top_k`` (5) and ``keep_alive``. The answer gives, per image in
order, its ``top_k`` labels with probabilities, likeliest first::

    {"model": "open-nsfw", "results": [{"labels": [{"label": "sfw", "score": 0.98}, ...]}]}

``/v1/images/generations`` takes OpenAI's JSON: ``model``, ``prompt``, ``n``,
``size`` (``"WxH"`` among those the model makes, or ``"auto"``),
``response_format`` (``b64_json``; ``url`` is refused: the server keeps no
files), with ``seed`` and ``steps`` as extensions; ``quality``, ``style`` and
``user`` are accepted and ignored. The answer is OpenAI's (``created``,
``data[].b64_json``: PNG files) plus the ``seed`` that makes the same images
again. Progress while the sampler runs is on the WebSocket (``draw``).

Images are decoded in a worker, never in the gateway: a hostile file
(a decompression bomb, a truncated or non-image file) is a typed error naming
the image's index (``too_large`` / ``bad_request``), bounded by
:data:`engine.images.MAX_IMAGE_BYTES` and :data:`engine.images.MAX_PIXELS`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncGenerator
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import Classification, ImageOptions, Images, ImageStep
from engine.images import decode_image
from gateway.auth import Principal
from gateway.generation import tracked_work
from gateway.http_common import guarded, post_route, read_body, unless_disconnected
from gateway.interface import Gateway
from gateway.model_routes import native_error
from gateway.openai_wire import InvalidParam, json_response, openai_error
from protocol.durations import parse_duration
from protocol.errors import BadRequest

__all__ = ["MAX_TOP_K", "classify", "generate_images", "image_routes", "parse_size"]

MAX_TOP_K = 100


class ClassifyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    images: list[str]
    top_k: int = 5
    keep_alive: str | int | float | None = None


async def classify(
    gateway: Gateway,
    principal: Principal,
    model: str,
    images: list[bytes],
    *,
    top_k: int = 5,
    keep_alive: float | None = None,
) -> Classification:
    """Classify ``images`` with ``model``: what every surface's classify request calls.

    Like a generation: refused while the server drains, the model resolved in
    ``principal``'s view and loaded, registered so a shutdown cancels it.
    """
    if not 1 <= top_k <= MAX_TOP_K:
        raise BadRequest(f"top_k must be within 1..{MAX_TOP_K}")
    with tracked_work(gateway):
        resolved = await gateway.ensure_model(principal, model, keep_alive)
        t0 = time.perf_counter()
        result = await gateway.engine.classify(
            resolved.key, images, top_k=top_k, keep_alive=keep_alive
        )
        gateway.metrics.job_seconds.labels("classify", model).observe(time.perf_counter() - t0)
    return Classification(result.labels, model)


class ImagesBody(msgspec.Struct, frozen=True):
    model: str
    prompt: str = ""
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    output_format: Literal["png"] = "png"
    # Extensions: the seed that fixes the images, and the sampler's steps.
    seed: int | None = None
    steps: int | None = None


def parse_size(size: str | None) -> tuple[int, int]:
    """``"WxH"`` as ``(width, height)``; ``None`` or ``"auto"`` as ``(0, 0)``: the model's own."""
    if size is None or size == "auto":
        return 0, 0
    w, sep, h = size.partition("x")
    if sep and w.isdigit() and h.isdigit() and 0 < int(w) <= 8192 and 0 < int(h) <= 8192:
        return int(w), int(h)
    raise BadRequest(f"size must be WIDTHxHEIGHT (like 512x512) or auto, not {size!r}")


async def generate_images(
    gateway: Gateway,
    principal: Principal,
    model: str,
    prompt: str,
    options: ImageOptions,
    *,
    keep_alive: float | None = None,
) -> AsyncGenerator[ImageStep | Images, None]:
    """Images for ``prompt``: a step event per sampler step, then the PNG files and seed.

    Like a generation: refused while the server drains, the model resolved in
    ``principal``'s view and loaded, registered so a shutdown cancels it.
    """
    with tracked_work(gateway):
        resolved = await gateway.ensure_model(principal, model, keep_alive)
        t0 = time.perf_counter()
        async for item in gateway.engine.generate_images_stream(
            resolved.key, prompt, options, keep_alive=keep_alive
        ):
            if isinstance(item, Images):
                gateway.metrics.job_seconds.labels("images", model).observe(
                    time.perf_counter() - t0
                )
                item = Images(images=item.images, seed=item.seed, model=model)
            yield item


def image_routes(gateway: Gateway) -> list[Route]:
    async def classify_route(request: Request) -> Response:
        body = await read_body(gateway, request, ClassifyBody)
        if not body.images:
            raise BadRequest("images must hold at least one image")
        images = [decode_image(text) for text in body.images]
        keep_alive = None if body.keep_alive is None else parse_duration(body.keep_alive)
        result = await unless_disconnected(
            request,
            classify(
                gateway,
                request.state.principal,
                body.model,
                images,
                top_k=body.top_k,
                keep_alive=keep_alive,
            ),
        )
        out = {
            "model": result.model,
            "results": [
                {"labels": [{"label": x.label, "score": x.score} for x in labels]}
                for labels in result.labels
            ],
        }
        return Response(msgspec.json.encode(out), media_type="application/json")

    async def generations(request: Request) -> Response:
        body = await read_body(gateway, request, ImagesBody)
        if body.response_format != "b64_json":
            raise InvalidParam(
                "response_format", "only b64_json is supported: the server keeps no image files"
            )
        if len(body.prompt) > 4000:
            raise InvalidParam("prompt", "prompt must be at most 4000 characters")
        try:
            width, height = parse_size(body.size)
        except BadRequest as exc:
            raise InvalidParam("size", exc.message) from None
        options = ImageOptions(
            n=body.n, width=width, height=height, steps=body.steps or 0, seed=body.seed
        )

        async def whole() -> Images:
            events = generate_images(
                gateway, request.state.principal, body.model, body.prompt, options
            )
            async for item in events:
                if isinstance(item, Images):
                    return item
            raise BadRequest("the image generation ended without images")

        made = await unless_disconnected(request, whole())
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in made.images]
        return json_response(
            {"created": int(time.time()), "data": data, "seed": made.seed, "model": body.model}
        )

    return [
        Route("/v1/classify", guarded(gateway, native_error, classify_route), methods=["POST"]),
        post_route(gateway, "/v1/images/generations", generations, openai_error),
    ]
