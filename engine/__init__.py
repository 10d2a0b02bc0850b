"""The FerrousForge engine: backends, worker pool, token rings.

The gateway imports only what this module exports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.requests import (
    ChatMessage,
    Classification,
    Embeddings,
    ErrorInfo,
    FinishReason,
    GenerateRequest,
    GenerationDone,
    ImageOptions,
    Images,
    ImageStep,
    Label,
    SamplingParams,
    Speech,
    SpeechChunk,
    SpeechOptions,
    Timings,
    TokenDelta,
    ToolCall,
    ToolFunction,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
    Usage,
)

if TYPE_CHECKING:
    from engine.client import (
        EngineClient,
        EngineConfig,
        EngineHealth,
        LoadedModel,
        ModelInfo,
        WorkerHealth,
    )

_CLIENT = {
    "EngineClient",
    "EngineConfig",
    "EngineHealth",
    "LoadedModel",
    "ModelInfo",
    "WorkerHealth",
}


def __getattr__(name: str) -> Any:
    # The client side (asyncio, the pool, residency) is imported on first use:
    # every engine worker process imports this package too, and needs none of it.
    if name in _CLIENT:
        from engine import client

        return getattr(client, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "ChatMessage",
    "Classification",
    "Embeddings",
    "EngineClient",
    "EngineConfig",
    "EngineHealth",
    "ErrorInfo",
    "FinishReason",
    "GenerateRequest",
    "GenerationDone",
    "ImageOptions",
    "ImageStep",
    "Images",
    "Label",
    "LoadedModel",
    "ModelInfo",
    "SamplingParams",
    "Speech",
    "SpeechChunk",
    "SpeechOptions",
    "Timings",
    "TokenDelta",
    "ToolCall",
    "ToolFunction",
    "TranscribeOptions",
    "Transcript",
    "TranscriptSegment",
    "Usage",
    "WorkerHealth",
]
