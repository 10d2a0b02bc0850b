"""The engine's settings: how many workers and threads, and every limit they work within."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.rings import DEFAULT_CAPACITY

__all__ = [
    "ONNX_SEQS",
    "SEQS_PER_THREAD",
    "EngineConfig",
    "default_threads",
    "default_workers",
]

# Measured on 2 cores with SmolLM2 (bench.scheduler): aggregate tokens/s keeps
# growing to ~8 sequences per thread and flattens beyond.
SEQS_PER_THREAD = 8
# The ONNX decoder's step cost grows little past ~4 rows (onnxruntime's int8
# kernels, bench.onnx_ceiling), but a burst of 8 chats on 4 rows waits half for
# the other half: 8 rows measured 1.72x llama-server's aggregate at 8 streams
# against 1.32-1.44x for 4 (bench.onnx --seqs 0).
ONNX_SEQS = 8


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads per worker: all cores up to 4 (decode stops scaling beyond that on small models)."""
    return max(1, min(4, _cpus()))


def default_workers() -> int:
    """Workers so that workers x threads fits the cores."""
    return max(1, _cpus() // default_threads())


@dataclass
class EngineConfig:
    workers: int = field(default_factory=default_workers)
    threads_per_worker: int = field(default_factory=default_threads)
    ring_capacity: int = DEFAULT_CAPACITY
    stall_timeout: float = 30.0  # seconds a consumer may leave a full ring unread
    # Seconds one request's prompt may take to render, tokenize and truncate in a
    # worker (others wait meanwhile); past it the request fails too_large.
    prepare_timeout: float = 2.0
    # Requests that may wait for a sequence slot of one model; more are refused
    # (overloaded). Waiting ones start by priority, then in turns between tenants.
    max_queued: int = 256
    start_timeout: float = 60.0  # worker start-up handshake
    load_timeout: float = 600.0
    n_batch: int = 512
    # Sequences one worker decodes together per model; 0 = chosen per model: for
    # GGUF as many context windows as half the memory budget holds, up to
    # SEQS_PER_THREAD per thread; ONNX_SEQS for ONNX; 1 for one-at-a-time backends.
    seqs_per_worker: int = 0
    # Prompt tokens a step may read while other sequences decode (engine.stepplan):
    # the longest a running stream waits for a newcomer's prompt.
    prefill_chunk: int = 64
    kv_unified: bool = False  # GGUF sequences share one cache (see LoadParams)
    # Reading finished chats' next turn markers ahead (engine.readahead): "idle" when
    # this worker and the machine are idle, "always" when this worker is, or "off".
    read_ahead: str = "idle"
    memory_budget: int = 0  # bytes loaded models may take; 0 = 80 % of available memory
    keep_alive: float = 300.0  # seconds an idle model stays loaded; < 0 = forever, 0 = unload
    # The watchdog: a worker that leaves a ping unanswered for health_timeout
    # seconds (model loads excepted) is killed and replaced. A worker answers
    # between decode steps, so the timeout must exceed the longest single step:
    # one n_batch prompt chunk of a large model on a small CPU can take tens of
    # seconds, hence the generous default. health_interval <= 0 turns it off.
    health_interval: float = 2.0  # seconds between watchdog pings of each worker
    health_timeout: float = 120.0
    # Each backend's own options, by backend name (e.g. "onnx": OnnxOptions); a
    # backend not listed gets its defaults (engine.backends.entry).
    options: dict[str, msgspec.Struct] = field(default_factory=dict)
    # Where workers run (engine.remote): None = child processes of this one; else a
    # host that starts them elsewhere (engine.rayhost.RayHost), which connect back
    # to ``worker_listen``.
    host: Any = None
    worker_listen: str = "127.0.0.1"
