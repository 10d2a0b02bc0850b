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
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import llama_cpp

from engine.backends.llamacpp import init_llama_cpp

__all__ = ["decode_tok_s", "read_ms"]


def _context(gguf: Path, *, threads: int, n_ctx: int, n_seq: int) -> tuple[object, object]:
    """The model and a context built as ``ferrous serve`` builds its own: a window of
    ``n_ctx`` cells for each of ``n_seq`` sequences, the same threads."""
    init_llama_cpp()
    model = llama_cpp.llama_model_load_from_file(
        str(gguf).encode(), llama_cpp.llama_model_default_params()
    )
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx * n_seq
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.no_perf = True
    return model, llama_cpp.llama_init_from_model(model, cparams)


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
    model, ctx = _context(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    memory = llama_cpp.llama_get_memory(ctx)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def feed(pos: int, n: int) -> float:
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = 100 + (pos + i) * 7919 % (vocab - 200)
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return (time.perf_counter() - t0) * 1000

    try:
        out = []
        for at, n in reads:
            llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
            for pos in range(0, at, 256):
                feed(pos, min(256, at - pos))
            times = []
            for _ in range(repeats):
                llama_cpp.llama_memory_seq_rm(memory, 0, at, -1)
                times.append(feed(at, n))
            out.append(statistics.median(times))
        return out
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


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
    model, ctx = _context(gguf, threads=threads, n_ctx=n_ctx, n_seq=n_seq)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def step(pos: int, n: int) -> None:
        """``n`` tokens of every row at positions ``pos`` onwards."""
        k = 0
        for row in range(rows):
            for i in range(n):
                batch.token[k] = 100 + (row * 131 + (pos + i) * 7919) % (vocab - 200)
                batch.pos[k] = pos + i
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = row
                batch.logits[k] = i == n - 1
                k += 1
        batch.n_tokens = k
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        step(0, max(1, min(at, 512 // rows)))
        start = max(1, min(at, 512 // rows))
        step(start, 1)  # warm: the first decode of this shape builds its graph
        t0 = time.perf_counter()
        for i in range(steps):
            step(start + 1 + i, 1)
        return rows * steps / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
