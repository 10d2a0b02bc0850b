"""The gateway as its surfaces see it: a small interface, not the application.

The HTTP surfaces (native, Ollama, OpenAI), the WebSocket sessions and the
generation service need a handful of things from the gateway: its
configuration, the engine, credentials, metrics, models, conversations and
quotas, and whether it is draining. They depend on :class:`Gateway`, this
protocol, rather than on :mod:`gateway.app`, which builds the routes from
them; so the modules import in one direction only, and a surface can be
exercised with any object that provides these members (a second node sharing
state elsewhere, for one).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from starlette.requests import Request

    from engine.interface import Engine
    from gateway.auth import Authenticator, Principal
    from gateway.config import ServerConfig
    from gateway.conversations import Conversations, ResponseStore
    from gateway.joblog import JobLogs
    from gateway.metrics import Metrics
    from gateway.mirror import SessionMirror
    from gateway.models import ModelRegistry, ResolvedModel
    from gateway.namespaces import ModelView
    from gateway.nodes import NodeRegistry
    from gateway.quotas import Quota, QuotaLedger
    from gateway.redisbus import Bus
    from gateway.resume import DetachedSessions
    from gateway.vad import VadModel

__all__ = ["Gateway"]


class Gateway(Protocol):
    """What every surface may use of the running gateway."""

    config: ServerConfig
    auth: Authenticator
    metrics: Metrics
    models: ModelRegistry
    conversations: Conversations
    #: Responses API answers kept for ``previous_response_id`` (per user, bounded).
    responses: ResponseStore
    quotas: QuotaLedger
    bus: Bus
    #: The nodes of the deployment (this one alone without shared state).
    nodes: NodeRegistry
    #: Where resumable sessions are written for another node to take over.
    mirror: SessionMirror
    #: Sessions that may be resumed after a dropped connection, by token.
    resumable: DetachedSessions
    version: str
    started_at: float
    #: True once shutdown began: surfaces refuse new work with ``overloaded``.
    draining: bool
    #: Video analyses running, or kept for a client to come back to.
    video_jobs: JobLogs
    #: Tasks consuming a generation for an HTTP request; shutdown cancels them.
    running: set[asyncio.Task[object]]

    @property
    def engine(self) -> Engine:
        """The engine, as its small interface (engine.interface); read-only here."""
        ...

    def quota_for(self, principal: Principal) -> tuple[str, Quota]:
        """Whose quota a request of ``principal`` counts against, and its limits."""
        ...

    def models_for(self, principal: Principal) -> ModelView:
        """``principal``'s view of the models (scopes, tenant namespace)."""
        ...

    async def model_names(self, principal: Principal) -> list[str]:
        """The names ``principal`` may use."""
        ...

    async def ensure_model(
        self, principal: Principal, name: str, keep_alive: float | None = None
    ) -> ResolvedModel:
        """``name`` resolved for ``principal`` and loaded."""
        ...

    async def voice_activity(self) -> VadModel:
        """The voice-activity model ``listen`` streams use (loaded, or pulled, on first use)."""
        ...

    def http_principal(self, request: Request) -> Principal:
        """The credential of an HTTP request, checked (raises ``Unauthorized``)."""
        ...
