"""What a pull reports as it goes: events shaped like Ollama's pull progress lines."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

__all__ = ["PullEvent", "PullListener"]


class PullEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One step of a pull, shaped like Ollama's pull progress lines."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


PullListener = Callable[[PullEvent], None]
