"""The prompts the load users send, one picked at random per request."""

from __future__ import annotations

PROMPTS = (
    "Say hello.",
    "Write one sentence about the sea.",
    "List three colours.",
    "What is a WebSocket, briefly?",
    "Tell me a very short story.",
)
