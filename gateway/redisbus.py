"""Messages between the nodes of a deployment, over Redis pub/sub.

A node that is asked to stop a generation it does not run (a ``Cancel`` that
reached another replica than the one streaming it) publishes the request;
every node hears it and stops the generation if it is its own (the
caller's, by owner and id). Pub/sub delivers to the nodes connected at that
moment and keeps nothing: a node that was down had nothing to stop.

:class:`LocalBus` is the one-node default, where there is nobody to tell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from gateway.background import stop

__all__ = ["Bus", "CancelNotice", "LocalBus", "RedisBus"]

log = logging.getLogger("ferrous.bus")


class CancelNotice(msgspec.Struct, frozen=True):
    """Stop generation ``id`` of (``tenant``, ``user``) wherever it runs."""

    tenant: str | None
    user: str
    id: str


Listener = Callable[[CancelNotice], object]


class Bus(Protocol):
    async def start(self) -> None: ...

    def listen(self, listener: Listener) -> None: ...

    async def cancel(self, notice: CancelNotice) -> int:
        """Tell every node; how many nodes heard it (0 where there are none)."""

    async def close(self) -> None: ...


class LocalBus:
    """One node: nothing to tell anyone."""

    async def start(self) -> None:
        return None

    def listen(self, listener: Listener) -> None:
        return None

    async def cancel(self, notice: CancelNotice) -> int:
        return 0

    async def close(self) -> None:
        return None


class RedisBus:
    """Pub/sub on ``{prefix}cancel`` (see the module)."""

    def __init__(self, url: str, *, prefix: str = "ferrous:") -> None:
        import redis.asyncio as aioredis  # only where state is shared

        self._redis: Any = aioredis.from_url(url, socket_connect_timeout=2)
        self._channel = f"{prefix}cancel"
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Start listening, and wait (a few seconds at most) until this node is
        subscribed: a notice published before that would not reach it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bus")
            try:
                await asyncio.wait_for(self._ready.wait(), 5.0)
            except TimeoutError:
                log.warning("the node bus is not subscribed yet (Redis unreachable?)")

    async def _run(self) -> None:
        decoder = msgspec.json.Decoder(CancelNotice)
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    async for message in pubsub.listen():
                        if message.get("type") == "subscribe":  # the server confirmed it
                            self._ready.set()
                            continue
                        if message.get("type") != "message":
                            continue
                        try:
                            notice = decoder.decode(message["data"])
                        except msgspec.DecodeError:
                            continue
                        for listener in self._listeners:
                            listener(notice)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: listen again once it is back
                log.warning("node bus interrupted: %s", exc)
                await asyncio.sleep(1.0)

    async def cancel(self, notice: CancelNotice) -> int:
        try:
            return int(await self._redis.publish(self._channel, msgspec.json.encode(notice)))
        except Exception as exc:
            log.warning("a cancel could not be sent to the other nodes: %s", exc)
            return 0

    async def close(self) -> None:
        await stop(self._task)
        await self._redis.aclose()
