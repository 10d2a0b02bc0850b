"""What llama.cpp itself takes to read ``n`` prompt tokens after ``at`` cached ones.

A follow-up turn's first token costs reading the new turn, whose every token
attends over the whole conversation before it: on two cores, ten tokens after
1,400 cached ones took 2.4x as long as after 25 (SmolLM2, flash attention as
llama.cpp chooses it). That growth is llama.cpp's compute, not a server's: it
is the ceiling a turn-10 / turn-1 time-to-first-token ratio can reach, and
``bench.scheduler`` reports it beside the measured ratio.

The context is built as ``ferrous serve`` builds its own (a window of
``n_ctx`` cells per sequence for ``n_seq`` sequences, the same threads), the
median of several reads is taken.

Beside it, the ceilings of a burst of streams (:func:`decode_tok_s`,
:func:`burst_tok_s`, :func:`median_first_token_ms`): what llama.cpp alone
gets out of the same work with no server around it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp

from engine.backends.llamacpp import init_llama_cpp

__all__ = ["burst_tok_s", "decode_tok_s", "median_first_token_ms", "read_ms"]


Span = tuple[int, int, int]
"""``(row, pos, n)``: ``n`` tokens of sequence ``row`` from position ``pos``."""


class _Llama:
    """A model and a context built as ``ferrous serve`` builds its own: a window of
    ``n_ctx`` cells for each of ``n_seq`` sequences, the same threads."""

    def __init__(self, gguf: Path, *, threads: int, n_ctx: int, n_seq: int) -> None:
        init_llama_cpp()
        self.model = llama_cpp.llama_model_load_from_file(
            str(gguf).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.batch: Any = llama_cpp.llama_batch_init(512, 0, 1)  # filled in place
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def feed(self, spans: list[Span]) -> float:
        """One ``llama_decode`` of the spans, logits for each span's last token
        (token ids spread over the vocabulary); its milliseconds."""
        batch, k = self.batch, 0
        for row, pos, n in spans:
            for i in range(n):
                batch.token[k] = 100 + (row * 131 + (pos + i) * 7919) % (self.vocab - 200)
                batch.pos[k] = pos + i
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = row
                batch.logits[k] = i == n - 1
                k += 1
        batch.n_tokens = k
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return (time.perf_counter() - t0) * 1000

    def read(self, spans: list[Span]) -> float:
        """The spans in steps of at most a batch (512 tokens); their milliseconds."""
        return sum(self.feed(step) for step in _steps(spans))

    def forget(self, row: int, after: int = 0) -> None:
        """Drop ``row``'s cells from position ``after`` on."""
        llama_cpp.llama_memory_seq_rm(self.memory, row, after, -1)


@contextmanager
def _llama(gguf: Path, *, threads: int, n_ctx: int, n_seq: int) -> Iterator[_Llama]:
    llama = _Llama(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq)
    try:
        yield llama
    finally:
        llama.close()


def read_ms(
    gguf: Path,
    reads: list[tuple[int, int]],
    *,
    threads: int,
    n_ctx: int = 2048,
    n_seq: int = 16,
    repeats: int = 7,
) -> list[float]:
    """Milliseconds to read ``n`` tokens after ``at`` cached ones, for each ``(at, n)``."""
    out = []
    with _llama(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq) as llama:
        for at, n in reads:
            llama.forget(0)
            for pos in range(0, at, 256):
                llama.feed([(0, pos, min(256, at - pos))])
            times = []
            for _ in range(repeats):
                llama.forget(0, at)
                times.append(llama.feed([(0, at, n)]))
            out.append(statistics.median(times))
    return out


def decode_tok_s(
    gguf: Path,
    rows: int,
    *,
    threads: int,
    at: int = 48,
    steps: int = 48,
    n_ctx: int = 2048,
    n_seq: int = 16,
) -> float:
    """Tokens a second llama.cpp alone decodes with ``rows`` sequences in every step.

    Each sequence (slots 0 .. rows-1, as a server fills them) first holds
    ``at`` tokens; then ``steps`` steps each feed one token of every row and
    take its logits, which is all a server's decode step asks of llama.cpp.
    No server streams tokens faster than this from the same steps: it is the
    ceiling of an aggregate figure at ``rows`` streams, prompts not counted.
    """
    if not 1 <= rows <= n_seq:
        raise ValueError(f"rows must be within 1..{n_seq}")
    start = max(1, min(at, 512 // rows))
    with _llama(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq) as llama:
        llama.feed([(row, 0, start) for row in range(rows)])
        llama.feed([(row, start, 1) for row in range(rows)])  # warm: builds this shape's graph
        t0 = time.perf_counter()
        for i in range(steps):
            llama.feed([(row, start + 1 + i, 1) for row in range(rows)])
        return rows * steps / (time.perf_counter() - t0)


def burst_tok_s(
    gguf: Path,
    reads: list[tuple[int, int]],
    tokens: int,
    *,
    threads: int,
    n_ctx: int = 2048,
    n_seq: int = 16,
) -> float:
    """Tokens a second llama.cpp alone gets out of a whole burst: every stream's
    prompt read and ``tokens`` tokens decoded for each, in the fewest steps.

    ``reads`` holds, per stream, the prompt tokens a cache already held and the
    ones read (``(cached, read)``, as a server reports them). The cached ones are
    put in place untimed; then one step reads every stream's new tokens at once
    (the most tokens a step, the cheapest way to read them on these kernels),
    and ``tokens - 1`` steps decode one token of every stream. Nothing staggers
    the streams and nothing is sampled, streamed or scheduled, so no server
    answers the same burst faster on the same kernels: the ceiling of a
    burst's aggregate, prompts counted, where :func:`decode_tok_s` leaves
    them out.
    """
    rows = len(reads)
    if not 1 <= rows <= n_seq:
        raise ValueError(f"streams must be within 1..{n_seq}")
    prompts = [(row, at, n) for row, (at, n) in enumerate(reads)]
    ends = [at + n for at, n in reads]
    with _llama(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq) as llama:
        llama.read([(row, 0, cached) for row, (cached, _) in enumerate(reads)])
        # Warm, then undone: the first step of each shape builds its graph.
        llama.read(prompts)
        llama.feed([(row, end, 1) for row, end in enumerate(ends)])
        for row, (at, _) in enumerate(reads):
            llama.forget(row, at)
        t0 = time.perf_counter()
        llama.read(prompts)
        for i in range(tokens - 1):
            llama.feed([(row, end + i, 1) for row, end in enumerate(ends)])
        return rows * tokens / (time.perf_counter() - t0)


def median_first_token_ms(
    gguf: Path,
    reads: list[tuple[int, int]],
    *,
    threads: int,
    n_ctx: int = 2048,
    n_seq: int = 16,
    repeats: int = 5,
) -> float:
    """The soonest a burst's median first token can come, in milliseconds after
    the burst: no sooner than llama.cpp alone reads the prompts it needs.

    The k-th first token of a burst needs k prompts read, at the least the k
    shortest (``reads`` as in :func:`burst_tok_s`), and one step reading all of
    them is the cheapest way to read them on these kernels. So the k-th first
    token comes no sooner than that step, and the median (of the middle one
    or two) no sooner than theirs: the floor of a median time to first token,
    before any request is parsed or any token sent.
    """
    n = len(reads)
    if not 1 <= n <= n_seq:
        raise ValueError(f"streams must be within 1..{n_seq}")
    shortest = sorted(range(n), key=lambda row: reads[row][1])
    middle = sorted({(n - 1) // 2, n // 2})  # the median's places, 0-based

    def first_tokens(llama: _Llama, k: int) -> float:
        """Milliseconds to read the ``k + 1`` shortest prompts in one step (median of tries)."""
        times = []
        for _ in range(repeats):
            for row, (at, _) in enumerate(reads):
                llama.forget(row, at)
            times.append(llama.read([(row, *reads[row]) for row in shortest[: k + 1]]))
        return statistics.median(times)

    with _llama(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq) as llama:
        llama.read([(row, 0, cached) for row, (cached, _) in enumerate(reads)])
        first_tokens(llama, middle[-1])  # warm: the first step of a shape builds its graph
        return statistics.mean(first_tokens(llama, k) for k in middle)


def _steps(spans: list[Span], size: int = 512) -> list[list[Span]]:
    """The spans cut into steps of at most ``size`` tokens (the batch's); none when empty."""
    steps: list[list[Span]] = []
    room = 0
    for row, pos, n in spans:
        while n > 0:
            if not room:
                steps.append([])
                room = size
            take = min(n, room)
            steps[-1].append((row, pos, take))
            pos, n, room = pos + take, n - take, room - take
    return steps
