"""WebSocket ``draw``: an image generation with its progress, on a session.

``started``; a ``progress`` event per sampler step (``status`` ``denoising``,
``completed`` of ``total``), so a page can show a bar while a many-step model
runs; each image as an ``image`` message (PNG bytes, which take flow-control
credits like text, so a slow reader holds back the images, not the server's
memory); ``done``. A cancel between steps ends it with ``done`` ``cancelled``;
a refusal (not an image model, a size it does not make) is an ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from engine import ImageOptions, Images
from gateway.image_routes import generate_images
from gateway.voiceturn import VoiceHost
from protocol import messages as m
from protocol.errors import FerrousError

__all__ = ["draw"]


async def draw(host: VoiceHost, msg: m.Draw) -> None:
    """A ``draw`` request, start to ``done`` (see the module)."""
    t0 = time.perf_counter()
    await host.send(m.Started(msg.id, msg.model))
    options = ImageOptions(
        n=msg.count, width=msg.width, height=msg.height, steps=msg.steps, seed=msg.seed
    )
    try:
        events = generate_images(host.gateway, host.principal, msg.model, msg.prompt, options)
        async with contextlib.aclosing(events):
            async for item in events:
                if isinstance(item, Images):
                    for index, png in enumerate(item.images):
                        await host._take_credit(len(png))
                        await host.send(m.ImageOut(msg.id, index, png, item.seed))
                else:
                    progress = m.Progress(
                        msg.id, "denoising", total=item.steps, completed=item.step
                    )
                    await host.send(progress)
    except FerrousError as exc:
        await host.send_error(exc, msg.id)
        return
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await host.send(_done(msg.id, "cancelled", t0))
        raise
    await host.send(_done(msg.id, "stop", t0))


def _done(gen_id: str, reason: str, t0: float) -> m.Done:
    total = (time.perf_counter() - t0) * 1000
    return m.Done(gen_id, reason, m.Usage(0, 0), m.Timings(0.0, 0.0, 0.0, total, 0.0))
