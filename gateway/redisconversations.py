"""Conversations in Redis: a conversation started on one node continues on another.

Each conversation is a Redis list of its messages (MessagePack), under a key
of its owner (tenant and user) and id; each owner has a sorted set of its
conversations by last use, trimmed to ``max_per_user`` (the least recently
used dropped with their messages), and every key expires after ``ttl``
seconds without use. A conversation past ``max_bytes`` (its messages as
stored) loses its oldest messages after the leading system ones, as
:func:`gateway.conversations.bounded` does in one process: one Lua script
appends, keeps the running size beside the list and trims, so two nodes
appending at once keep the bound.

:meth:`RedisConversations.append` is called when a turn is answered and must
not wait (a turn commits its own messages at once); the write is queued and
sent in order, and the next :meth:`~RedisConversations.history` of that
conversation on this node waits for it first, so a client never reads its
own conversation without its last turn. Another node sees the turn once it
is written (a millisecond on a LAN). When Redis cannot be reached, a history
is an ``overloaded`` error (retryable), and a turn that could not be written
is logged: the conversation goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from engine import ChatMessage as EngineMessage
from gateway.conversations import Conversation, Owner
from protocol.errors import Overloaded

__all__ = ["RedisConversations"]

log = logging.getLogger("ferrous.conversations")

_messages = msgspec.msgpack.Encoder()
_message = msgspec.msgpack.Decoder(EngineMessage)

# KEYS: the conversation's list, its size. ARGV: ttl, max bytes, the messages.
# A stored message is a MessagePack map whose first field is its role, so a system
# message starts (after the map's one-byte header) with "role" then "system".
_APPEND = """
local list, size = KEYS[1], KEYS[2]
local added = 0
for i = 3, #ARGV do
  redis.call('RPUSH', list, ARGV[i])
  added = added + #ARGV[i]
end
local total = redis.call('INCRBY', size, added)
local cap = tonumber(ARGV[2])
if total > cap then
  local items = redis.call('LRANGE', list, 0, -1)
  local first = 1
  while first < #items and string.sub(items[first], 2, 13) == '\\164role\\166system' do
    first = first + 1
  end
  local last = first - 1
  while total > cap and last < #items - 1 do
    last = last + 1
    total = total - #items[last]
  end
  if last >= first then
    for i = first, last do redis.call('LSET', list, i - 1, '\\0dropped') end
    redis.call('LREM', list, 0, '\\0dropped')
    redis.call('SET', size, total)
  end
end
redis.call('EXPIRE', list, ARGV[1])
redis.call('EXPIRE', size, ARGV[1])
return total
"""


class RedisConversations:
    """The :class:`~gateway.conversations.Conversations` of a deployment (see the module)."""

    def __init__(
        self,
        url: str,
        *,
        max_per_user: int,
        prefix: str = "ferrous:",
        ttl: float = 7 * 24 * 3600.0,
        max_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        import redis.asyncio as aioredis  # only where state is shared

        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._prefix = prefix
        self._max = max_per_user
        self._ttl = int(ttl)
        self._max_bytes = max_bytes
        self._append = self._redis.register_script(_APPEND)
        self._pending: dict[str, asyncio.Task[None]] = {}  # key -> its last queued write

    def _owner(self, owner: Owner) -> str:
        tenant, user = owner
        return msgspec.json.encode([tenant, user]).decode()

    def _key(self, owner: Owner, conv_id: str) -> str:
        return f"{self._prefix}c:{{{self._owner(owner)}}}:{conv_id}"

    def _index(self, owner: Owner) -> str:
        return f"{self._prefix}c:{{{self._owner(owner)}}}"

    async def history(self, owner: Owner, conv_id: str, model: str) -> Conversation:
        key = self._key(owner, conv_id)
        pending = self._pending.get(key)
        if pending is not None:
            await asyncio.shield(pending)  # this node's last turn first
        conv = Conversation(model)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.lrange(key, 0, -1)
            pipe.zadd(self._index(owner), {conv_id: time.time()})
            pipe.expire(key, self._ttl)
            pipe.expire(key + "#size", self._ttl)
            pipe.expire(self._index(owner), self._ttl)
            pipe.zrange(self._index(owner), 0, -self._max - 1)
            raw, *_, stale = await pipe.execute()
            if stale:  # past the bound: the least recently used go, with their messages
                names = [s.decode() if isinstance(s, bytes) else s for s in stale]
                keys = [self._key(owner, n) for n in names]
                # Their own last turns land first, or a late write would bring one back.
                waits = [self._pending[k] for k in keys if k in self._pending]
                if waits:
                    await asyncio.gather(*waits, return_exceptions=True)
                drop = self._redis.pipeline(transaction=True)
                drop.zrem(self._index(owner), *names)
                drop.delete(*keys, *(k + "#size" for k in keys))
                await drop.execute()
        except Exception as exc:
            log.warning("conversation store unavailable: %s", exc)
            raise Overloaded(
                "the shared conversation store cannot be reached; retry shortly", retry_after=2.0
            ) from None
        conv.messages = [_message.decode(x) for x in raw]
        return conv

    def append(self, owner: Owner, conv_id: str, messages: list[EngineMessage]) -> None:
        if not messages:
            return
        key = self._key(owner, conv_id)
        before = self._pending.get(key)
        data = [_messages.encode(m) for m in messages]

        async def write() -> None:
            if before is not None:
                with contextlib.suppress(Exception):
                    await before
            try:
                await self._append(
                    keys=[key, key + "#size"], args=[self._ttl, self._max_bytes, *data]
                )
            except Exception as exc:
                log.warning("a conversation turn was not written: %s", exc)
            finally:
                if self._pending.get(key) is task:
                    del self._pending[key]

        task = asyncio.get_running_loop().create_task(write())
        self._pending[key] = task

    async def forget(self, owner: Owner, conv_id: str) -> bool:
        key = self._key(owner, conv_id)
        pending = self._pending.get(key)
        if pending is not None:
            await asyncio.shield(pending)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._index(owner), conv_id)
            pipe.delete(key, key + "#size")
            removed, _ = await pipe.execute()
        except Exception as exc:
            raise Overloaded(
                "the shared conversation store cannot be reached; retry shortly", retry_after=2.0
            ) from exc
        return bool(removed)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        await self._redis.aclose()
