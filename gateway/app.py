"""The gateway application: HTTP routes and the WebSocket endpoint on one ASGI app.

Authentication happens at the WebSocket handshake: a request without a valid
credential gets an HTTP 401 with a JSON body and is never upgraded. A
credential is read from, in order: ``?ticket=`` (single use, from
``POST /v1/tickets``), ``Authorization: Bearer``, ``X-API-Key``, or a
``ferrous.token.<JWT>`` subprotocol offer (browsers cannot set headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from engine import EngineClient
from gateway.auth import Authenticator, Principal, Unauthorized
from gateway.config import ServerConfig
from gateway.logs import bind
from gateway.metrics import Metrics
from gateway.models import ModelRegistry, ResolvedModel
from gateway.native import generation_routes, model_routes
from gateway.ollama import ollama_routes
from gateway.openai_api import openai_routes
from gateway.sessions import CLOSE_GOING_AWAY, ConversationStore, Session
from protocol.codec import SUBPROTOCOLS, codec_for
from protocol.errors import ErrorCode, FerrousError
from protocol.messages import SUBPROTOCOL_JSON, TOKEN_SUBPROTOCOL_PREFIX

__all__ = ["Gateway", "__version__", "error_body"]

__version__ = "0.1.0"

STATIC_DIR = Path(__file__).with_name("static")

log = logging.getLogger("ferrous.gateway")


def error_body(code: ErrorCode, message: str, *, retryable: bool = False) -> dict[str, object]:
    return {"error": {"code": code.value, "message": message, "retryable": retryable}}


def _denial(status: int, code: ErrorCode, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


class Gateway:
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
        self.conversations = ConversationStore(config.limits.max_conversations)
        self.sessions: set[Session] = set()
        self.draining = False
        self.started_at = time.time()
        self.running: set[asyncio.Task[object]] = set()  # tasks consuming a generation
        self._openapi: bytes | None = None
        self.models = ModelRegistry(config, engine)
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/metrics", self.metrics_endpoint),
                Route("/v1/tickets", self.tickets, methods=["POST"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                *generation_routes(self),
                *model_routes(self),
                *openai_routes(self),
                *ollama_routes(self),
                WebSocketRoute("/v1/ws", self.websocket),
                # The chat page and the JS client it uses (static, no build step).
                Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True, follow_symlink=True)),
            ]
        )

    # -- models ---------------------------------------------------------------------------

    async def model_names(self) -> list[str]:
        return await asyncio.to_thread(self.models.names)

    async def ensure_model(self, name: str, keep_alive: float | None = None) -> ResolvedModel:
        """Load ``name`` on first use (configured models, the store, then the catalog)."""
        return await self.models.ensure(name, keep_alive=keep_alive)

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
        ticket = self.auth.issue_ticket(principal)
        return JSONResponse({"ticket": ticket, "expires_in": self.config.auth.ticket_ttl})

    # -- WebSocket ------------------------------------------------------------------------

    def _ws_principal(self, ws: WebSocket, offered: list[str]) -> Principal:
        ticket = ws.query_params.get("ticket")
        if ticket:
            return self.auth.redeem_ticket(ticket)
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
            principal = self._ws_principal(ws, offered)
        except Unauthorized as exc:
            self.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
            await ws.send_denial_response(_denial(401, ErrorCode.UNAUTHORIZED, exc.message))
            return
        if len(self.sessions) >= self.config.limits.max_sessions:
            await ws.send_denial_response(_denial(503, ErrorCode.OVERLOADED, "too many sessions"))
            return
        await ws.accept(subprotocol=chosen)
        session = Session(self, ws, principal, codec_for(chosen or SUBPROTOCOL_JSON))
        self.sessions.add(session)
        self.metrics.sessions.inc()
        with bind(session=session.id):
            log.info("session opened for %s (%s)", principal.user, principal.method)
            try:
                await session.run()
            except Exception:
                log.exception("session failed")
                await session.close(1011)
            finally:
                self.sessions.discard(session)
                self.metrics.sessions.dec()
                log.info("session closed")

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
        for s in list(self.sessions):
            with contextlib.suppress(FerrousError, OSError):
                await s.close(CLOSE_GOING_AWAY, "server shutting down")
