"""Protocol v1 video messages: ``watch`` a video analysis job, its ``video`` events out.

A video is uploaded over HTTP (``POST /v1/video/analyze`` with ``detach=true``
gives a job id); ``watch`` follows that job over the session: ``started``,
``progress`` (``status`` ``transcript`` or ``frames``, ``completed`` of
``total``), a ``video`` event per analysed frame, transcript segment or
notice, then ``done`` (``cancel`` stops the job). ``after`` skips the events
already seen (they are numbered from 1), so a client that reconnects picks up
where it was. See docs/protocol.md, "Video".
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .fields import GenerationId, _ClientBase, _ServerBase

__all__ = ["LabelScore", "VideoEvent", "Watch"]


class Watch(_ClientBase, tag="watch"):
    """Follow video job ``job`` as generation ``id``, from the event after ``after``."""

    id: GenerationId
    job: Annotated[str, Meta(min_length=1, max_length=64)]
    after: Annotated[int, Meta(ge=0)] = 0


class LabelScore(msgspec.Struct, forbid_unknown_fields=True):
    label: str
    score: float


class VideoEvent(_ServerBase, tag="video"):
    """One result of watched job ``id``: a ``frame`` (its time ``t`` and ``labels`` or
    ``embedding``), a transcript ``segment`` (``t`` to ``end``, ``text``) or a ``notice``
    (``text``); ``seq`` is the job's own number for it (``after`` resumes from it)."""

    id: str
    event: Literal["frame", "segment", "notice"]
    seq: int
    t: float | None = None
    end: float | None = None
    labels: list[LabelScore] | None = None
    embedding: list[float] | None = None
    text: str | None = None
    n: int | None = None  # the message's number in the session (resume)
