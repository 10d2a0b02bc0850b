"""Field types and message bases shared by the message modules (protocol v1).

Client messages reject unknown fields; server messages may gain fields in
later v1 revisions. Both leave out fields at their default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "ConversationId",
    "Format",
    "GenerationId",
    "KeepAlive",
    "ModelName",
    "Options",
    "Priority",
]

GenerationId = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+(?!\n)$")
]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
# Seconds, or a duration string ("5m", "1h"); negative keeps the model loaded, 0 unloads it.
KeepAlive = float | Annotated[str, Meta(max_length=32)]
# Structured output: "json" (any JSON object) or a JSON Schema the output must satisfy.
Format = Literal["json"] | dict[str, Any]
# Scheduling class of a request: higher starts sooner when the model is busy. A
# caller's class is capped by its credential (a JWT ``priority`` claim or its API
# key's priority); asking above the cap is lowered to it.
MIN_PRIORITY = -100
MAX_PRIORITY = 100
Priority = Annotated[int, Meta(ge=MIN_PRIORITY, le=MAX_PRIORITY)]
ConversationId = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+(?!\n)$")
]


class _ClientBase(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    pass


class _ServerBase(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class Options(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling options; every field is optional and the server's defaults apply."""

    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    seed: Annotated[int, Meta(ge=0, lt=2**32)] | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    stop: (
        Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)]
        | None
    ) = None
    ignore_eos: bool | None = None  # end-of-generation tokens are never chosen (benchmarks)
    # Log-probabilities in the deltas: each token's, and this many alternatives (0-20).
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
