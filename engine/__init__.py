"""The FerrousForge engine: backends, worker pool, token rings.

The gateway imports only what this module exports.
"""

from __future__ import annotations

from engine.client import (
    EngineClient,
    EngineConfig,
    EngineHealth,
    LoadedModel,
    ModelInfo,
    WorkerHealth,
)
from engine.requests import (
    ChatMessage,
    Embeddings,
    ErrorInfo,
    FinishReason,
    GenerateRequest,
    GenerationDone,
    SamplingParams,
    Timings,
    TokenDelta,
    ToolCall,
    ToolFunction,
    Usage,
)

__all__ = [
    "ChatMessage",
    "Embeddings",
    "EngineClient",
    "EngineConfig",
    "EngineHealth",
    "ErrorInfo",
    "FinishReason",
    "GenerateRequest",
    "GenerationDone",
    "LoadedModel",
    "ModelInfo",
    "SamplingParams",
    "Timings",
    "TokenDelta",
    "ToolCall",
    "ToolFunction",
    "Usage",
    "WorkerHealth",
]
