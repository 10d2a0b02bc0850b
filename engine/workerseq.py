"""One generation inside an engine worker: its request, where its text goes, and its clock.

The worker (:mod:`engine.worker`) decides when a generation starts, steps it
and moves its records into its ring; this holds what belongs to the
generation itself and needs no I/O: the text stream that holds back what
may still become a stop string, the token ids and log-probabilities gathered
since the last record, the records waiting for room in the ring, the
timestamps its usage report is computed from, and that report.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import msgspec

from engine import ipc
from engine.backends import TextGenerator
from engine.logprobs import TokenLogprob, TopLogprob
from engine.netring import NetRingWriter
from engine.requests import FinishReason
from engine.rings import Ring
from engine.textstream import TextStream
from protocol.errors import FerrousError

__all__ = ["WorkerSeq"]

_LP_ENCODER = msgspec.msgpack.Encoder()


class WorkerSeq:
    """One generation inside the worker."""

    __slots__ = (
        "backend",
        "ending",
        "gen",
        "ids",
        "lps",
        "model",
        "msg",
        "n_out",
        "n_prompt",
        "order",
        "outbox",
        "paused_since",
        "prompt",
        "ring",
        "started",
        "stream",
        "suspended",
        "t_accept",
        "t_end",
        "t_first",
        "t_start",
    )

    def __init__(
        self, msg: ipc.Generate, ring: Ring | NetRingWriter, backend: TextGenerator, model: str
    ) -> None:
        self.msg = msg
        self.gen = msg.gen
        self.ring = ring
        self.backend = backend
        self.model = model
        self.stream = TextStream(msg.sampling.stop)
        self.prompt: list[int] = []
        self.ids: list[int] = []
        self.lps: list[TokenLogprob] = []  # log-probabilities of the tokens in ``ids``
        self.outbox: deque[tuple[list[int], bytes, bytes]] = deque()  # ids, text, extra
        self.ending: FinishReason | None = None
        self.started = False
        self.suspended = False  # paused for another sequence (engine.preemption)
        self.order = 0  # when it started, for the preemption rule
        self.paused_since: float | None = None
        self.n_prompt = 0
        self.n_out = 0
        self.t_accept = time.perf_counter()
        self.t_start = 0.0
        self.t_first = 0.0
        self.t_end = 0.0

    def add_token(
        self,
        token: int,
        spell: Callable[[int], bytes],
        logprob: tuple[float, list[tuple[int, float]]] | None,
    ) -> bool:
        """Take one generated token (not an end token); True when a record is ready to go.

        Its text waits in the stream while it may still begin a stop string;
        the ids and log-probabilities go with the next record.
        """
        self.n_out += 1
        self.ids.append(token)
        if logprob is not None:
            chosen, top = logprob
            self.lps.append(
                TokenLogprob(
                    token, spell(token), chosen, [TopLogprob(i, spell(i), p) for i, p in top]
                )
            )
        text = self.stream.feed(spell(token))
        if not text and not (self.msg.token_ids and self.stream.stopped):
            return False
        self._queue(text)
        return True

    def close_text(self, reason: FinishReason) -> None:
        """The generation ends for ``reason``: what the stream held back goes out last."""
        self.t_end = time.perf_counter()
        tail = self.stream.flush()
        if tail or (self.ids and self.msg.token_ids) or self.lps:
            self._queue(tail)
        self.ids = []
        self.ending = reason

    def finished(
        self,
        reason: FinishReason,
        error: FerrousError | None,
        load_ms: float,
        cached: int,
    ) -> ipc.Finished:
        """Its last message: why it ended, its token counts and timings."""
        now = time.perf_counter()
        end = self.t_end or now
        first = self.t_first or end
        decode_s = end - first
        tok_s = (self.n_out - 1) / decode_s if self.n_out > 1 and decode_s > 0 else 0.0
        return ipc.Finished(
            gen=self.gen,
            reason=reason.value,
            prompt_tokens=self.n_prompt,
            completion_tokens=self.n_out,
            load_ms=load_ms,
            queue_ms=((self.t_start or now) - self.t_accept) * 1000,
            ttft_ms=(first - self.t_accept) * 1000 if self.t_first else 0.0,
            total_ms=(end - self.t_accept) * 1000,
            decode_tok_s=tok_s,
            error_code=error.code.value if error else None,
            error_message=error.message if error else None,
            cached_tokens=cached,
        )

    def _queue(self, text: str) -> None:
        """A record of ``text`` with the ids and log-probabilities gathered since the last."""
        ids = self.ids if self.msg.token_ids else []
        self.ids = []
        extra = b""
        if self.lps:
            extra = _LP_ENCODER.encode(self.lps)
            self.lps = []
        self.outbox.append((ids, text.encode("utf-8"), extra))
