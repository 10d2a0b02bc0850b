"""The node registry of a deployment, in Redis (see :mod:`gateway.nodes`).

Two hashes: ``{prefix}nodes`` (node id -> when it last beat, on the Redis
server's clock) and ``{prefix}nodeinfo`` (node id -> when it started and its
version). A node beats every ``heartbeat`` seconds and removes itself when it
stops cleanly; a killed node's entry stays, ageing, and is dropped once it is
an hour old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from gateway.background import stop
from gateway.nodes import NodeInfo

__all__ = ["RedisNodes"]

log = logging.getLogger("ferrous.nodes")

FORGET_AFTER = 3600.0  # a dead node's entry is dropped after this long

_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], tostring(now))
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return tostring(now)
"""

# Every node's age (seconds since its beat), on the server's clock; old entries dropped.
_AGES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local beats = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #beats, 2 do
  local age = now - tonumber(beats[i + 1])
  if age > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], beats[i])
    redis.call('HDEL', KEYS[2], beats[i])
  else
    table.insert(out, beats[i])
    table.insert(out, tostring(age))
  end
end
return out
"""

_AGE = """
local beat = redis.call('HGET', KEYS[1], ARGV[1])
if not beat then return false end
local t = redis.call('TIME')
return tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(beat))
"""


class _Info(msgspec.Struct):
    started: float
    version: str


class RedisNodes:
    """The :class:`~gateway.nodes.NodeRegistry` of a deployment (see the module)."""

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        prefix: str = "ferrous:",
        heartbeat: float = 1.0,
        dead_after: float = 3.0,
        version: str = "",
    ) -> None:
        import redis.asyncio as aioredis  # only where state is shared

        self.node_id = node_id
        self.dead_after = dead_after
        self.heartbeat = heartbeat
        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._keys = [f"{prefix}nodes", f"{prefix}nodeinfo"]
        self._info = msgspec.json.encode(_Info(time.time(), version)).decode()
        self._beat = self._redis.register_script(_BEAT)
        self._ages = self._redis.register_script(_AGES)
        self._age = self._redis.register_script(_AGE)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The first beat is written before this returns, so others see this node at once."""
        if self._task is not None:
            return
        try:
            await self._beat(keys=self._keys, args=[self.node_id, self._info])
        except Exception as exc:
            log.warning("this node could not announce itself: %s", exc)
        self._task = asyncio.create_task(self._run(), name="node heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat(keys=self._keys, args=[self.node_id, ""])
            except Exception as exc:  # Redis away: keep beating once it is back
                log.warning("node heartbeat not written: %s", exc)

    async def age(self, node_id: str) -> float | None:
        value = await self._age(keys=self._keys[:1], args=[node_id])
        return None if value is None else float(value)

    async def nodes(self) -> list[NodeInfo]:
        flat = await self._ages(keys=self._keys, args=[FORGET_AFTER])
        ages = {
            (k.decode() if isinstance(k, bytes) else k): float(v)
            for k, v in zip(flat[::2], flat[1::2], strict=True)
        }
        infos = await self._redis.hmget(self._keys[1], list(ages)) if ages else []
        out = []
        decoder = msgspec.json.Decoder(_Info)
        for (node, age), raw in zip(ages.items(), infos, strict=True):
            info = _Info(0.0, "")
            if raw is not None:
                with contextlib.suppress(msgspec.DecodeError):
                    info = decoder.decode(raw)
            out.append(
                NodeInfo(node, round(age, 3), age <= self.dead_after, info.started, info.version)
            )
        return sorted(out, key=lambda n: n.id)

    async def close(self) -> None:
        """Stop beating and leave the registry: a node that stops cleanly is not 'dead'."""
        await stop(self._task)
        with contextlib.suppress(Exception):
            await self._redis.hdel(self._keys[0], self.node_id)
            await self._redis.hdel(self._keys[1], self.node_id)
        await self._redis.aclose()
