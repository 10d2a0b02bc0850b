"""The gateway application: HTTP routes and the WebSocket endpoint on one ASGI app.

Authentication happens at the WebSocket handshake: a request without a valid
credential gets an HTTP 401 with a JSON body and is never upgraded. A
credential is read from, in order: ``?ticket=`` (single use, from
``POST /v1/tickets``), ``Authorization: Bearer``, ``X-API-Key``, or a
``ferrous.token.<JWT>`` subprotocol offer (browsers cannot set headers).

Before the credential is even looked at, the handshake must pass the
admission limits of :mod:`gateway.limits` (rate and connections per client
address); after it, the per-user connection limit. Those refusals are HTTP 429
with the same JSON body and a ``Retry-After`` header. An upgraded connection
that sends no ``hello`` within ``limits.hello_timeout`` is closed (1008).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine import EngineClient
from gateway.audio_routes import audio_routes
from gateway.auth import Authenticator, Principal, Unauthorized
from gateway.config import ServerConfig, ferrous_home
from gateway.conversations import Conversations, ConversationStore, ResponseStore
from gateway.credentials import (
    REVOKED_FILE,
    FileRevocations,
    LocalTickets,
    Revocations,
    TicketBook,
)
from gateway.generate_routes import generation_routes
from gateway.generation import fair_share_key
from gateway.image_routes import image_routes
from gateway.joblog import JobLogs
from gateway.limits import AdmissionControl, Lease, Refusal
from gateway.logs import bind
from gateway.metrics import Metrics
from gateway.mirror import NoMirror, SessionMirror
from gateway.model_routes import model_routes
from gateway.models import ModelRegistry, ResolvedModel
from gateway.namespaces import ModelView
from gateway.nodes import LocalNodes, NodeRegistry, default_node_id
from gateway.ollama import ollama_routes
from gateway.openai_api import openai_routes
from gateway.origins import BrowserGuard, BrowserPolicy
from gateway.process_tuning import GcTuner
from gateway.quotas import LocalQuotas, Quota, QuotaLedger
from gateway.redisbus import Bus, LocalBus
from gateway.responses_api import responses_routes
from gateway.resume import DetachedSessions
from gateway.sessions import CLOSE_GOING_AWAY, CLOSE_POLICY, Session
from gateway.vad import VadModel
from gateway.version import __version__
from gateway.video_routes import video_routes
from protocol.codec import SUBPROTOCOLS, codec_for
from protocol.errors import BadRequest, ErrorCode, FerrousError, ModelNotFound
from protocol.messages import SUBPROTOCOL_JSON, TOKEN_SUBPROTOCOL_PREFIX

__all__ = ["GatewayApp", "error_body"]


STATIC_DIR = Path(__file__).with_name("static")
REVOCATION_CHECK_INTERVAL = 0.5  # seconds between checks of the API key file

log = logging.getLogger("ferrous.gateway")


def error_body(code: ErrorCode, message: str, *, retryable: bool = False) -> dict[str, object]:
    return {"error": {"code": code.value, "message": message, "retryable": retryable}}


def _denial(status: int, code: ErrorCode, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _too_many(refusal: Refusal) -> JSONResponse:
    """A 429: unlike the other refusals, retrying later (after Retry-After) may succeed."""
    return JSONResponse(
        error_body(ErrorCode.RATE_LIMITED, refusal.message, retryable=True),
        status_code=429,
        headers={"Retry-After": str(refusal.retry_after)},
    )


# A session yields to the event loop after this many messages read in a row.
_YIELD_EVERY = 4


class _FairWebSocket:
    """A Starlette WebSocket whose ``receive`` yields to the event loop every few messages.

    Why: uvicorn queues every frame of one read (up to 256 KiB) before the app
    runs, and awaiting a non-empty queue or a writable transport does not
    suspend. A client sending thousands of tiny messages per read would keep
    its session's loop running, and every other stream waiting, until its
    queue was empty. Everything else is delegated unchanged.
    """

    __slots__ = ("_n", "_ws")

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._n = 0

    async def receive(self) -> Message:
        self._n += 1
        if self._n >= _YIELD_EVERY:
            self._n = 0
            await asyncio.sleep(0)
        return await self._ws.receive()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)


class GatewayApp:
    """Holds the engine, the authenticator, sessions and metrics; ``app`` is the ASGI app."""

    def __init__(
        self,
        config: ServerConfig,
        engine: EngineClient,
        auth: Authenticator,
    ) -> None:
        self.config = config
        self.engine = engine
        self.auth = auth
        self.version = __version__
        self.metrics = Metrics()
        self.metrics.watch_engine(engine.loaded, engine.worker_pids, engine.worker_places)
        self.conversations: Conversations = ConversationStore(
            config.limits.max_conversations, config.limits.max_conversation_bytes
        )
        self.responses = ResponseStore(config.limits.max_stored_responses)
        self.quotas: QuotaLedger = LocalQuotas()
        self.bus: Bus = LocalBus()
        state = config.state
        self.nodes: NodeRegistry = LocalNodes(state.node or None, self.version)
        self.mirror: SessionMirror = NoMirror()
        self.revocations: Revocations = FileRevocations(ferrous_home(config) / REVOKED_FILE)
        self.ticket_book: TicketBook = LocalTickets(auth)
        if state.url:
            from gateway.redisauth import RedisRevocations, RedisTickets

            self.revocations = RedisRevocations(state.url, prefix=state.prefix)
            self.ticket_book = RedisTickets(
                state.url,
                auth,
                ttl=config.auth.ticket_ttl,
                per_user=config.auth.max_tickets_per_user,
                prefix=state.prefix,
            )
            from gateway.redisnodes import RedisNodes
            from gateway.redissessions import RedisSessions

            self.nodes = RedisNodes(
                state.url,
                node_id=state.node or default_node_id(),
                prefix=state.prefix,
                heartbeat=state.heartbeat,
                dead_after=state.dead_after,
                version=self.version,
            )
            if config.limits.resume_window > 0:
                self.mirror = RedisSessions(
                    state.url,
                    self.nodes,
                    prefix=state.prefix,
                    window=config.limits.resume_window,
                )
            from gateway.redisbus import RedisBus  # redis only where state is shared
            from gateway.redisquotas import RedisQuotas

            self.quotas = RedisQuotas(
                config.state.url, prefix=config.state.prefix, lease_ttl=config.state.lease_ttl
            )
            self.bus = RedisBus(config.state.url, prefix=config.state.prefix)
            from gateway.redisconversations import RedisConversations

            self.conversations = RedisConversations(
                config.state.url,
                max_per_user=config.limits.max_conversations,
                prefix=config.state.prefix,
                max_bytes=config.limits.max_conversation_bytes,
            )
        self.sessions: set[Session] = set()  # attached and detached ones
        self.resumable = DetachedSessions(
            config.limits.resume_window, config.limits.max_detached_sessions
        )
        self.metrics.detached.set_function(lambda: len(self.resumable))
        self.mirror.on_lost(self._taken_elsewhere)
        auth.revocations = self.revocations.revoked
        self.draining = False
        self.started_at = time.time()
        self.running: set[asyncio.Task[object]] = set()  # tasks consuming a generation
        self.video_jobs = JobLogs(config.limits.resume_window)
        lim = config.limits
        self.admission = AdmissionControl(
            per_ip=lim.max_connections_per_ip,
            per_user=lim.max_connections_per_user,
            rate=lim.handshake_rate,
            burst=lim.handshake_burst,
        )
        self._closing: set[asyncio.Task[None]] = set()
        # ``ferrous serve`` sets this: it freezes the GC after bursts of accepts and sweeps
        # after bursts of closes (see gateway.process_tuning).
        self.gc_tuner: GcTuner | None = None
        self._openapi: bytes | None = None
        self.models = ModelRegistry(config, engine)
        self._vad: VadModel | None = None
        self._vad_lock = asyncio.Lock()
        routes = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/metrics", self.metrics_endpoint),
                Route("/v1/tickets", self.tickets, methods=["POST"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                *generation_routes(self),
                *model_routes(self),
                *openai_routes(self),
                *audio_routes(self),
                *image_routes(self),
                *video_routes(self),
                *responses_routes(self),
                *ollama_routes(self),
                WebSocketRoute("/v1/ws", self.websocket),
                # The chat page and the JS client it uses (static, no build step).
                Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True, follow_symlink=True)),
            ]
        )
        # Host and Origin checks and CORS for every route (gateway.origins).
        self.browser = BrowserPolicy(
            origins=config.browser.origins, hosts=config.browser.hosts, bound_host=config.host
        )
        self.app = BrowserGuard(routes, self.browser)

    # -- models ---------------------------------------------------------------------------

    def quota_for(self, principal: Principal) -> tuple[str, Quota]:
        """Whose quota a request of ``principal`` counts against, and its limits."""
        key = fair_share_key(principal)
        if principal.quota is not None:
            return key, principal.quota
        quotas = self.config.quotas
        own = quotas.tenants.get(principal.tenant) if principal.tenant else None
        if own is not None:
            return key, own
        return key, Quota(
            concurrent=quotas.concurrent,
            requests_per_minute=quotas.requests_per_minute,
            tokens_per_minute=quotas.tokens_per_minute,
            weight=quotas.weight,
        )

    def models_for(self, principal: Principal) -> ModelView:
        """``principal``'s view of the models: scopes, tenant namespace, what it may see."""
        return ModelView.of(self.models, principal)

    async def model_names(self, principal: Principal) -> list[str]:
        return await asyncio.to_thread(self.models_for(principal).names)

    async def ensure_model(
        self, principal: Principal, name: str, keep_alive: float | None = None
    ) -> ResolvedModel:
        """Load ``name`` on first use (the caller's own models, configured ones, the
        shared store, then the catalog)."""
        return await self.models_for(principal).ensure(name, keep_alive=keep_alive)

    async def voice_activity(self) -> VadModel:
        """The voice-activity model of ``listen`` streams, loaded on first use."""
        async with self._vad_lock:
            if self._vad is None:
                name = self.config.voice.vad_model
                path = Path(name).expanduser()
                if not path.is_absolute():
                    manager = self.models.manager
                    record = await manager.find(name)
                    if record is None and self.config.auto_pull and manager.catalog_entry(name):
                        record = await manager.pull(name)
                    if record is None:
                        raise ModelNotFound(
                            f"listening needs the voice-activity model {name!r}: "
                            f"pull it first (ferrous pull {name})"
                        )
                    path = manager.store.model_path(record)
                self._vad = await asyncio.to_thread(VadModel, path)
            return self._vad

    # -- HTTP -----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse(
            {"status": "draining" if self.draining else "ok", "version": self.version}
        )

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of the native and OpenAI surfaces (no credential needed)."""
        if self._openapi is None:
            from gateway.openapi import openapi_document

            self._openapi = json.dumps(openapi_document(self.version)).encode()
        return Response(self._openapi, media_type="application/json")

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(
            self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def http_principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        credential = header[7:].strip() if header.lower().startswith("bearer ") else None
        return self.auth.authenticate(credential or request.headers.get("x-api-key"))

    async def tickets(self, request: Request) -> Response:
        """A short-lived single-use ticket for a browser's WebSocket URL."""
        try:
            principal = self.http_principal(request)
        except Unauthorized as exc:
            return _denial(401, ErrorCode.UNAUTHORIZED, exc.message)
        try:
            ticket = await self.ticket_book.issue(principal)
        except Unauthorized as exc:
            return _denial(401, ErrorCode.UNAUTHORIZED, exc.message)
        return JSONResponse({"ticket": ticket, "expires_in": self.config.auth.ticket_ttl})

    # -- WebSocket ------------------------------------------------------------------------

    async def _ws_principal(self, ws: WebSocket, offered: list[str]) -> Principal:
        ticket = ws.query_params.get("ticket")
        if ticket:
            return await self.ticket_book.redeem(ticket)
        header = ws.headers.get("authorization", "")
        credential = header[7:].strip() if header.lower().startswith("bearer ") else None
        credential = credential or ws.headers.get("x-api-key")
        if not credential:
            credential = next(
                (
                    p[len(TOKEN_SUBPROTOCOL_PREFIX) :]
                    for p in offered
                    if p.startswith(TOKEN_SUBPROTOCOL_PREFIX)
                ),
                None,
            )
        return self.auth.authenticate(credential)

    async def websocket(self, ws: WebSocket) -> None:
        ip = ws.client.host if ws.client is not None else ""
        admitted = self.admission.admit(ip)
        if isinstance(admitted, Refusal):
            await self._refuse(ws, admitted)
            return
        try:
            await self._handshake(ws, admitted)
        finally:
            admitted.release()  # whichever way the handshake or the session ended

    async def _refuse(self, ws: WebSocket, refusal: Refusal) -> None:
        self.metrics.errors.labels(ErrorCode.RATE_LIMITED.value).inc()
        await ws.send_denial_response(_too_many(refusal))

    async def _handshake(self, ws: WebSocket, lease: Lease) -> None:
        offered = [p.strip() for p in ws.scope.get("subprotocols", [])]
        ours = [p for p in offered if not p.startswith(TOKEN_SUBPROTOCOL_PREFIX)]
        chosen = next((p for p in ours if p in SUBPROTOCOLS), None)
        if ours and chosen is None:
            await ws.send_denial_response(
                _denial(
                    400,
                    ErrorCode.BAD_REQUEST,
                    f"unsupported subprotocol {', '.join(ours)}; offer {' or '.join(SUBPROTOCOLS)}",
                )
            )
            return
        if self.draining:
            await ws.send_denial_response(
                _denial(503, ErrorCode.OVERLOADED, "the server is shutting down")
            )
            return
        try:
            principal = await self._ws_principal(ws, offered)
        except Unauthorized as exc:
            self.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
            await ws.send_denial_response(_denial(401, ErrorCode.UNAUTHORIZED, exc.message))
            return
        refusal = self.admission.admit_user(lease, f"{principal.tenant or ''}/{principal.user}")
        if refusal is not None:
            await self._refuse(ws, refusal)
            return
        if len(self.sessions) >= self.config.limits.max_sessions:
            await ws.send_denial_response(_denial(503, ErrorCode.OVERLOADED, "too many sessions"))
            return
        await ws.accept(subprotocol=chosen)
        # The handshake's headers are read: let them go rather than keep them (a few
        # KiB, raw and parsed) as long as the session lasts, which may be hours.
        ws.scope["headers"] = []
        ws.__dict__.pop("_headers", None)
        if self.gc_tuner is not None:
            self.gc_tuner.note_accept()
        session = Session(
            self, _FairWebSocket(ws), principal, codec_for(chosen or SUBPROTOCOL_JSON)
        )
        session.on_end = self._session_ended
        self.sessions.add(session)
        self.metrics.sessions.inc()
        hello_timeout = self.config.limits.hello_timeout
        if hello_timeout > 0:
            # Not cancelled when the session ends: the callback checks, and a handle that
            # is not kept is freed once it has run instead of living as long as the session.
            asyncio.get_running_loop().call_later(hello_timeout, self._no_hello, session)
        try:
            await self._serve(session, principal)
        finally:
            if self.gc_tuner is not None:
                self.gc_tuner.note_close()

    async def _serve(self, session: Session, principal: Principal) -> None:
        """Run sessions over one connection: the one it opened, or the one its hello resumed."""
        how = "closed"
        with bind(session=session.id):
            log.info("session opened for %s (%s)", principal.user, principal.method)
            try:
                how = await session.run()
                if how == "resumed" and session.taken_over_by is not None:
                    await session.end()  # this connection's own session never started
                    session = session.taken_over_by
                    with bind(session=session.id):
                        how = await session.run()
            except WebSocketDisconnect:
                how = "dropped"  # the client left while a reply was being sent
            except Exception:
                log.exception("session failed")
                how = "closed"
                await session.close(1011)
            finally:
                if how == "dropped" and not self.draining:
                    log.info("connection dropped: session kept for a resume")
                    session.detach()
                elif how != "superseded":
                    await asyncio.shield(session.end())
                    log.info("session closed")

    def _session_ended(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.metrics.sessions.dec()

    def _no_hello(self, session: Session) -> None:
        """``hello_timeout`` passed since the upgrade: close a session that never said hello."""
        if session.helloed or session.closed or session not in self.sessions:
            return
        self.metrics.timeouts.labels("hello").inc()
        task = asyncio.ensure_future(self._close_without_hello(session))
        self._closing.add(task)  # a strong reference until it is done
        task.add_done_callback(self._closing.discard)

    async def _close_without_hello(self, session: Session) -> None:
        limit = self.config.limits.hello_timeout
        await session.send_error(BadRequest(f"no hello within {limit:g} s"))
        await session.close(CLOSE_POLICY, "hello timeout")

    def _taken_elsewhere(self, token: str) -> None:
        """Another node took over a session of this one (it was taken for dead): end ours."""
        session = self.resumable.get(token)
        if isinstance(session, Session) and not session.ended:
            task = asyncio.create_task(session.taken_elsewhere())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- revocation -----------------------------------------------------------------------

    async def watch_revocations(self, interval: float = REVOCATION_CHECK_INTERVAL) -> None:
        """End sessions whose API key was revoked, within ``interval`` seconds.

        Keys are revoked by ``ferrous key revoke`` (another process) rewriting
        the key file; a stat per tick notices, and the file is parsed again
        only when it changed. Sessions opened with a JWT end when it expires.
        """
        while True:
            await asyncio.sleep(interval)
            await self.revocations.refresh()
            held = [
                s
                for s in self.sessions
                if (s.principal.key_id or s.principal.token_id) is not None and not s.ended
            ]
            if not held:
                continue
            try:
                valid = self.auth.key_ids()
            except Exception:  # keep watching: a bad moment on disk must not end the watch
                log.exception("reading the API keys failed")
                continue
            for session in held:
                p = session.principal
                if (p.key_id is not None and p.key_id not in valid) or self.revocations.revoked(p):
                    log.info("closing session %s: its credential was revoked", session.id)
                    session.revoked()

    # -- shutdown -------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Refuse new work, let generations finish for ``grace`` seconds, cancel the rest, close 1001."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (any(s.gens for s in self.sessions) or self.running) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(s.stop_generations() for s in list(self.sessions)))
        # HTTP generations still running: cancelling their tasks closes their streams.
        for task in list(self.running):
            task.cancel()
        await self.video_jobs.close()
        await self.quotas.close()
        await self.bus.close()
        await self.conversations.close()
        for s in list(self.sessions):
            with contextlib.suppress(FerrousError, OSError):
                await s.close(CLOSE_GOING_AWAY, "server shutting down")
        for s in list(self.sessions):
            if s.closed:  # detached: nobody will resume it now
                await s.end()
        await self.mirror.close()  # after the sessions' ends are queued
        await self.nodes.close()
        await self.revocations.close()
        await self.ticket_book.close()
