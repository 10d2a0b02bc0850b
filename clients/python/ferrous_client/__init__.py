"""FerrousForge client: stream generations from a FerrousForge server over WebSocket.

:class:`FerrousClient` (asyncio) carries many concurrent generations on one
connection; :class:`SyncFerrousClient` runs one at a time without an event
loop. Both raise the exceptions of :mod:`ferrous_client.errors`, one class
per protocol error code. The message types are the server's own
(:mod:`ferrous_client.protocol`), so the client cannot drift from the
protocol it speaks.
"""

from __future__ import annotations

from ferrous_client.backoff import Backoff
from ferrous_client.client import DEFAULT_URL, ErrorHandler, FerrousClient, Generation
from ferrous_client.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    ConnectionLost,
    EngineError,
    FerrousClientError,
    Forbidden,
    InternalError,
    ModelNotFound,
    NotFound,
    Overloaded,
    RateLimited,
    ResumeExpired,
    Stalled,
    TooLarge,
    Unauthorized,
)
from ferrous_client.handshake import VERSION
from ferrous_client.protocol.errors import ErrorCode
from ferrous_client.protocol.messages import (
    ChatMessage,
    Delta,
    Done,
    Limits,
    Options,
    Queued,
    Ready,
    Started,
    Timings,
    Usage,
)
from ferrous_client.sync import SyncFerrousClient, SyncGeneration
from ferrous_client.voice import VoiceEvent, VoiceStream

__all__ = [
    "DEFAULT_URL",
    "Backoff",
    "BadRequest",
    "Cancelled",
    "ChatMessage",
    "Conflict",
    "ConnectionLost",
    "Delta",
    "Done",
    "EngineError",
    "ErrorCode",
    "ErrorHandler",
    "FerrousClient",
    "FerrousClientError",
    "Forbidden",
    "Generation",
    "InternalError",
    "Limits",
    "ModelNotFound",
    "NotFound",
    "Options",
    "Overloaded",
    "Queued",
    "RateLimited",
    "Ready",
    "ResumeExpired",
    "Stalled",
    "Started",
    "SyncFerrousClient",
    "SyncGeneration",
    "Timings",
    "TooLarge",
    "Unauthorized",
    "Usage",
    "VoiceEvent",
    "VoiceStream",
    "__version__",
]

__version__ = VERSION
