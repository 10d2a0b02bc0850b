"""Resumable sessions mirrored in Redis, for another node to take over (see :mod:`gateway.mirror`).

Per session (keys named by a hash of its resume token, never the token):

* ``{prefix}s:<h>`` — a hash: the node running it, its id and owner, ``lost``
  and ``last`` (message numbers), and ``g:<id>`` the request of every
  generation still running;
* ``{prefix}s:<h>:log`` — a sorted set of its messages (MessagePack) scored by
  their number, from the last acknowledged one on, at most ``max_messages``.

Writes are queued and sent every few milliseconds, each session's in one Lua
script that first checks the session is still this node's: a node that lost
its session to another (it was taken for dead, or a client resumed it
elsewhere) learns it on its next write and ends its copy. A generation's last
message is written before it reaches the client (:meth:`RedisSessions.sync`),
so a generation the client saw end is never run again. Both keys expire
``ttl`` seconds after the last write; a node refreshes its idle sessions every
third of that, so a session outlives its node by at least the resume window.

Taking over (:meth:`RedisSessions.take`) waits until the session's node has
missed its heartbeats (``[state] dead_after``, :mod:`gateway.nodes`), then
moves the session to this node in one script and reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.background import stop
from gateway.mirror import LostSession, MirroredSession
from gateway.nodes import NodeRegistry
from protocol import messages as m
from protocol.errors import Conflict, Forbidden, ResumeExpired

__all__ = ["RedisSessions"]

log = logging.getLogger("ferrous.sessions")


# KEYS: record, log. ARGV: node, ttl, max messages, session id, owner, opening (1/0),
# then operations of three arguments each: m n payload | r gen request | f gen - |
# a n - | e - - | x - - (writes were lost: no exact resume).
_FLUSH = """
local rec, log, node = KEYS[1], KEYS[2], ARGV[1]
local holder = redis.call('HGET', rec, 'node')
if ARGV[6] == '1' then
  redis.call('DEL', rec, log)
  redis.call('HSET', rec, 'node', node, 'session', ARGV[4], 'owner', ARGV[5], 'lost', 0, 'last', 0)
elseif not holder then
  -- its record expired or was lost: no exact resume from what is left
  redis.call('HSET', rec, 'node', node, 'session', ARGV[4], 'owner', ARGV[5],
             'lost', '9007199254740992', 'last', 0)
elseif holder ~= node then
  return 0
end
local i = 7
while i + 2 <= #ARGV do
  local kind, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if kind == 'm' then
    redis.call('ZADD', log, a, b)
    redis.call('HSET', rec, 'last', a)
  elseif kind == 'r' then
    redis.call('HSET', rec, 'g:' .. a, b)
  elseif kind == 'f' then
    redis.call('HDEL', rec, 'g:' .. a)
  elseif kind == 'a' then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', a)
    if tonumber(a) > tonumber(redis.call('HGET', rec, 'lost')) then
      redis.call('HSET', rec, 'lost', a)
    end
  elseif kind == 'e' then
    redis.call('DEL', rec, log)
    return 1
  elseif kind == 'x' then
    redis.call('HSET', rec, 'lost', '9007199254740992')
  end
end
local size = redis.call('ZCARD', log)
local cap = tonumber(ARGV[3])
if size > cap then
  local cut = redis.call('ZRANGE', log, size - cap - 1, size - cap - 1, 'WITHSCORES')
  redis.call('ZREMRANGEBYRANK', log, 0, size - cap - 1)
  if tonumber(cut[2]) > tonumber(redis.call('HGET', rec, 'lost')) then
    redis.call('HSET', rec, 'lost', cut[2])
  end
end
redis.call('EXPIRE', rec, ARGV[2])
redis.call('EXPIRE', log, ARGV[2])
return 1
"""

# KEYS: record, log. ARGV: this node, owner, the node expected to hold it ('' to
# only look), the client's last. Returns {0} none, {-1} another owner's,
# {1, node} (looked), {2, node} (someone else holds it now), {3, fields, log}.
_TAKE = """
local rec, log = KEYS[1], KEYS[2]
local node = redis.call('HGET', rec, 'node')
if not node then return {0} end
if redis.call('HGET', rec, 'owner') ~= ARGV[2] then return {-1} end
if ARGV[3] == '' then return {1, node} end
if node ~= ARGV[3] then return {2, node} end
redis.call('HSET', rec, 'node', ARGV[1])
return {3, redis.call('HGETALL', rec), redis.call('ZRANGEBYSCORE', log, '(' .. ARGV[4], '+inf')}
"""


def _owner_text(owner: tuple[str | None, str]) -> str:
    return json.dumps(list(owner), separators=(",", ":"))


MAX_RETAINED = 3 * 2000  # queued arguments a session keeps while the store is away


class _Ops:
    """What is queued for one session until the next flush."""

    __slots__ = ("args", "broken", "opening", "owner", "session")

    def __init__(self) -> None:
        self.opening = False
        self.broken = False  # writes were lost: the store's copy cannot be resumed exactly
        self.session = ""
        self.owner = ""
        self.args: list[str | bytes | int] = []

    def before(self, newer: _Ops) -> _Ops:
        """These (unwritten) operations, then ``newer``'s: one batch, in order."""
        if newer.opening:
            return newer  # a new start: what came before it is moot
        self.args += newer.args
        self.broken = self.broken or newer.broken
        return self

    def bounded(self) -> _Ops:
        """Past ``MAX_RETAINED``, give the copy up: a takeover is then refused as expired
        rather than resumed with a gap (the session itself goes on here)."""
        if len(self.args) > MAX_RETAINED:
            self.args, self.broken = [], True
        return self


class RedisSessions:
    """The :class:`~gateway.mirror.SessionMirror` of a deployment (see the module)."""

    shared = True

    def __init__(
        self,
        url: str,
        nodes: NodeRegistry,
        *,
        prefix: str = "ferrous:",
        window: float = 30.0,
        max_messages: int = 4096,
        interval: float = 0.005,
    ) -> None:
        import redis.asyncio as aioredis  # only where state is shared

        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._nodes = nodes
        self._prefix = prefix
        self.ttl = max(60, int(window * 2) + 1)
        self._max = max_messages
        self._interval = interval
        self._flush_script = self._redis.register_script(_FLUSH)
        self._take_script = self._redis.register_script(_TAKE)
        self._queued: dict[str, _Ops] = {}  # by token
        self._known: dict[str, tuple[str, str]] = {}  # token -> (session, owner) of ours
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._lost: list[LostSession] = []
        self.healthy = True  # the last write went through
        self._flusher: asyncio.Task[None] | None = None
        self._toucher: asyncio.Task[None] | None = None

    def _keys(self, token: str) -> list[str]:
        h = hashlib.sha256(token.encode()).hexdigest()[:32]
        base = f"{self._prefix}s:{{{h}}}"  # one hash tag: both keys in one cluster slot
        return [base, base + ":log"]

    # -- queued writes ----------------------------------------------------------------

    def _ops(self, token: str) -> _Ops:
        ops = self._queued.get(token)
        if ops is None:
            ops = self._queued[token] = _Ops()
            session, owner = self._known.get(token, ("", ""))
            ops.session, ops.owner = session, owner
        if not self._wake.is_set():
            self._wake.set()
        return ops

    def opened(self, token: str, session: str, owner: tuple[str | None, str]) -> None:
        self._known[token] = (session, _owner_text(owner))
        self._queued.pop(token, None)
        ops = self._ops(token)
        ops.opening = True

    def adopted(self, token: str, session: str, owner: tuple[str | None, str]) -> None:
        """A session taken over from another node is this node's from now on."""
        self._known[token] = (session, _owner_text(owner))

    def sent(self, token: str, n: int, payload: bytes) -> None:
        if token in self._known:
            self._ops(token).args += ["m", n, payload]

    def started(self, token: str, gen_id: str, request: bytes) -> None:
        if token in self._known:
            self._ops(token).args += ["r", gen_id, request]

    def finished(self, token: str, gen_id: str) -> None:
        if token in self._known:
            self._ops(token).args += ["f", gen_id, ""]

    def acked(self, token: str, n: int) -> None:
        if token in self._known:
            self._ops(token).args += ["a", n, ""]

    def ended(self, token: str) -> None:
        if token in self._known:
            self._ops(token).args += ["e", "", ""]
            del self._known[token]

    def on_lost(self, callback: LostSession) -> None:
        self._lost.append(callback)

    async def sync(self) -> None:
        if not self._queued or self._flusher is None or not self.healthy:
            return  # (a store that is away does not hold sessions up)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), 2.0)

    # -- the writer -----------------------------------------------------------------

    async def start(self, tokens: Callable[[], list[str]]) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="session mirror")
            self._toucher = asyncio.create_task(self._touch_loop(tokens), name="session ttl")

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._waiters:
                await asyncio.sleep(self._interval)  # gather a batch
            self._wake.clear()
            batch, self._queued = self._queued, {}
            waiters, self._waiters = self._waiters, []
            try:
                await self._flush(batch)
                if not self.healthy:
                    log.info("session mirror written again")
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.healthy:
                    log.warning("session mirror not written (%d sessions): %s", len(batch), exc)
                self.healthy = False
                # Kept, in order, ahead of what came since: written when the store is back.
                for token, ops in batch.items():
                    newer = self._queued.get(token)
                    self._queued[token] = (ops if newer is None else ops.before(newer)).bounded()
                self._wake.set()
            finally:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
            if not self.healthy:
                await asyncio.sleep(0.5)  # the store is away: try again shortly

    async def _flush(self, batch: dict[str, _Ops]) -> None:
        if not batch:
            return
        order = []
        # A pipeline holds a connection until reset: the block resets it, failed or not.
        async with self._redis.pipeline(transaction=False) as pipe:
            for token, ops in batch.items():
                args = [
                    self._nodes.node_id,
                    self.ttl,
                    self._max,
                    ops.session,
                    ops.owner,
                    "1" if ops.opening else "0",
                    *(("x", "", "") if ops.broken else ()),
                    *ops.args,
                ]
                await self._flush_script(keys=self._keys(token), args=args, client=pipe)
                order.append(token)
            results = await pipe.execute()
        for token, ok in zip(order, results, strict=True):
            if int(ok) == 0 and token in self._known:
                del self._known[token]
                log.info("a session of this node was taken over by another node")
                for callback in self._lost:
                    callback(token)

    async def _touch_loop(self, tokens: Callable[[], list[str]]) -> None:
        """Keep idle sessions' keys alive while this node runs them."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            mine = [t for t in tokens() if t in self._known]
            for i in range(0, len(mine), 500):
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for token in mine[i : i + 500]:
                            for key in self._keys(token):
                                pipe.expire(key, self.ttl)
                        await pipe.execute()
                except Exception as exc:
                    log.warning("session mirror keys not refreshed: %s", exc)
                    break

    # -- taking over ------------------------------------------------------------------

    async def take(self, token: str, owner: tuple[str | None, str], last: int) -> MirroredSession:
        keys = self._keys(token)
        me, who = self._nodes.node_id, _owner_text(owner)
        found = await self._take_script(keys=keys, args=[me, who, "", last])
        code = int(found[0])
        if code == 0:
            raise ResumeExpired("no session to resume: it ended, or its resume window passed")
        if code == -1:
            raise Forbidden("the resume token belongs to another user's session")
        holder = _text(found[1])
        if holder == me:
            raise ResumeExpired("no session to resume: it ended on this node")
        await self._wait_until_gone(holder)
        taken = await self._take_script(keys=keys, args=[me, who, holder, last])
        if int(taken[0]) != 3:
            raise Conflict("another node took this session over meanwhile")
        fields = {_text(k): v for k, v in zip(taken[1][::2], taken[1][1::2], strict=True)}
        server = msgspec.msgpack.Decoder(m.ServerMessage)
        client = msgspec.msgpack.Decoder(m.ClientMessage)
        messages = []
        for raw in taken[2]:
            with contextlib.suppress(msgspec.DecodeError):
                messages.append(server.decode(raw))
        pending: dict[str, m.ClientMessage | None] = {}
        for name, raw in fields.items():
            if name.startswith("g:"):
                request = None
                if raw:
                    with contextlib.suppress(msgspec.DecodeError):
                        request = client.decode(raw)
                pending[name[2:]] = request
        self._known[token] = (_text(fields.get("session", b"")), who)
        return MirroredSession(
            _text(fields.get("session", b"")),
            int(float(fields.get("lost", 0))),
            int(float(fields.get("last", 0))),
            messages,
            pending,
        )

    async def _wait_until_gone(self, holder: str) -> None:
        """Wait until ``holder`` has missed its heartbeats; Conflict if it keeps beating."""
        nodes = self._nodes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + nodes.dead_after + 1.0
        while True:
            age = await nodes.age(holder)
            if age is None or age > nodes.dead_after:
                return
            if loop.time() >= deadline:
                raise Conflict(
                    f"this session runs on node {holder}, which is up: connect to that node"
                )
            await asyncio.sleep(min(0.25, max(0.05, nodes.dead_after - age)))

    async def close(self) -> None:
        await stop(self._flusher)
        await stop(self._toucher)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self._flush(self._queued)
        await self._redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
