"""The native image routes: ``POST /v1/classify``.

A request is JSON: ``model`` (an image classification model), ``images`` (each
base64 or a ``data:image/...;base64,`` URL: PNG, JPEG, WebP, GIF, BMP), and
optionally ``top_k`` (5) and ``keep_alive``. The answer gives, per image in
order, its ``top_k`` labels with probabilities, likeliest first::

    {"model": "open-nsfw", "results": [{"labels": [{"label": "sfw", "score": 0.98}, ...]}]}

Images are decoded in a worker, never in the gateway: a hostile file
(a decompression bomb, a truncated or non-image file) is a typed error naming
the image's index (``too_large`` / ``bad_request``), bounded by
:data:`engine.images.MAX_IMAGE_BYTES` and :data:`engine.images.MAX_PIXELS`.
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import Classification
from engine.images import decode_image
from gateway.auth import Principal
from gateway.generation import tracked_work
from gateway.http_common import guarded, read_body, unless_disconnected
from gateway.interface import Gateway
from gateway.model_routes import native_error
from protocol.durations import parse_duration
from protocol.errors import BadRequest

__all__ = ["MAX_TOP_K", "classify", "image_routes"]

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

    return [Route("/v1/classify", guarded(gateway, native_error, classify_route), methods=["POST"])]
