"""Prometheus metrics of one gateway (its own registry, so several can live in one process)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import LoadedModel

__all__ = ["MAX_TENANT_LABELS", "Metrics"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside a running loop (not by the server itself)
        return -1.0


# Distinct tenant label values; later tenants are counted as "other" (bounded series).
MAX_TENANT_LABELS = 100


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "ferrous_time_to_first_token_seconds",
            "Time from a generate/chat message to its first delta sent, by model.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ferrous_inter_token_latency_seconds",
            "Time between consecutive deltas of one generation, by model.",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ferrous_tokens_generated",
            "Completion tokens generated, by model.",
            ["model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "ferrous_prompt_tokens_cached",
            "Prompt tokens whose keys and values were copied from a cached prefix instead of "
            "read, by model.",
            ["model"],
            registry=r,
        )
        self.finished = Counter(
            "ferrous_generations_finished",
            "Generations that ended, by model, tenant and reason (stop, length, cancelled, "
            "stalled, or the error code).",
            ["model", "tenant", "reason"],
            registry=r,
        )
        self.embedded = Counter(
            "ferrous_embedding_inputs", "Texts embedded, by model.", ["model"], registry=r
        )
        self.embedding_tokens = Counter(
            "ferrous_embedding_tokens",
            "Tokens read for embeddings, by model.",
            ["model"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "ferrous_audio_seconds",
            "Seconds of audio transcribed, by model.",
            ["model"],
            registry=r,
        )
        self.speech_seconds = Counter(
            "ferrous_speech_seconds",
            "Seconds of speech synthesised, by model.",
            ["model"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "ferrous_job_seconds",
            "Wall time of a job (a transcription, ...) from its request to its result, by kind and model.",
            ["kind", "model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        ProcessCollector(registry=r)  # process_* series of the gateway
        self.sessions = Gauge("ferrous_active_sessions", "Open WebSocket sessions.", registry=r)
        self.detached = Gauge(
            "ferrous_detached_sessions",
            "Sessions whose connection dropped, kept for a resume.",
            registry=r,
        )
        self.resumes = Counter(
            "ferrous_session_resumes",
            "Resume attempts by outcome (resumed, expired, refused).",
            ["outcome"],
            registry=r,
        )
        self.generations = Gauge("ferrous_active_generations", "Generations in flight.", registry=r)
        # Read at scrape time, on the event loop's thread (the /metrics handler runs there):
        # a number that only grows under a steady load is a leak.
        self.tasks = Gauge(
            "ferrous_asyncio_tasks", "asyncio tasks alive in the gateway's event loop.", registry=r
        )
        self.tasks.set_function(_task_count)
        self.errors = Counter(
            "ferrous_errors", "Errors sent to clients, by code.", ["code"], registry=r
        )
        self.refusals = Counter(
            "ferrous_generation_refusals",
            "Generations refused before they ran, by reason (rate_limited: a tenant's "
            "quota, or a session's cap on running generations, counted without a model; "
            "overloaded: the model's queue is full), tenant and model.",
            ["reason", "tenant", "model"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "ferrous_tenant_tokens",
            "Tokens by tenant and model: kind=prompt (read), cached (prompt tokens copied "
            "from a cached prefix), completion (generated).",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self._tenants: set[str] = set()
        self.queue_wait = Histogram(
            "ferrous_queue_wait_seconds",
            "Time a generation waited for a sequence slot of its model, by model and tenant.",
            ["model", "tenant"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.pauses = Counter(
            "ferrous_backpressure_pauses",
            "Times a generation waited for the client (credits or a full socket).",
            registry=r,
        )

        self.timeouts = Counter(
            "ferrous_connection_timeouts",
            "Connections closed for being too slow: no complete request head within "
            "limits.handshake_timeout (phase=handshake) or no hello within "
            "limits.hello_timeout (phase=hello).",
            ["phase"],
            registry=r,
        )

    def watch_engine(
        self,
        loaded: Callable[[], list[LoadedModel]],
        worker_pids: Callable[[], dict[int, int]],
        worker_places: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        """Read the engine's loaded models and worker processes at each scrape."""
        self.registry.register(_EngineCollector(loaded, worker_pids, worker_places))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tenant_label(self, fair_share_key: str) -> str:
        """The ``tenant`` label of a request's fair-share key (``t:NAME`` or ``u:USER``).

        Users without a tenant are not told apart (their number is unbounded):
        they share the label ``""``. Past :data:`MAX_TENANT_LABELS` tenants,
        new ones are counted as ``other``.
        """
        if not fair_share_key.startswith("t:"):
            return ""
        name = fair_share_key[2:]
        if name in self._tenants:
            return name
        if len(self._tenants) >= MAX_TENANT_LABELS:
            return "other"
        self._tenants.add(name)
        return name


class _EngineCollector(Collector):
    """Series read at scrape time: loaded models, and each worker process's resources."""

    def __init__(
        self,
        loaded: Callable[[], list[LoadedModel]],
        worker_pids: Callable[[], dict[int, int]],
        worker_places: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        self._loaded = loaded
        self._worker_pids = worker_pids
        self._worker_places = worker_places

    def describe(self) -> list[Metric]:
        return []  # read at each scrape (the set of models changes)

    def collect(self) -> Iterator[Metric]:
        models = self._loaded()
        yield GaugeMetricFamily(
            "ferrous_models_loaded", "Models in memory.", value=float(len(models))
        )
        memory = GaugeMetricFamily(
            "ferrous_model_memory_bytes",
            "Estimated memory of each loaded model (weights once, plus every worker's caches).",
            labels=["model", "backend"],
        )
        load = GaugeMetricFamily(
            "ferrous_model_load_seconds",
            "How long loading each loaded model took (its slowest worker).",
            labels=["model"],
        )
        active = GaugeMetricFamily(
            "ferrous_model_active_generations",
            "Generations running on each loaded model.",
            labels=["model"],
        )
        providers = GaugeMetricFamily(
            "ferrous_model_execution_provider",
            "1 for each execution provider a loaded ONNX model runs on (rank 0 is preferred).",
            labels=["model", "provider", "rank"],
        )
        for x in models:
            memory.add_metric([x.name, x.backend], float(x.size))
            load.add_metric([x.name], x.load_ms / 1000)
            active.add_metric([x.name], float(x.active))
            for rank, provider in enumerate(x.providers):
                providers.add_metric([x.name, provider, str(rank)], 1.0)
        yield from (memory, load, active, providers)
        cpu = CounterMetricFamily(
            "ferrous_worker_cpu_seconds",
            "CPU time of each engine worker process (user + system).",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            "ferrous_worker_resident_memory_bytes",
            "Resident memory of each engine worker process.",
            labels=["worker"],
        )
        fds = GaugeMetricFamily(
            "ferrous_worker_open_fds",
            "Open file descriptors of each engine worker.",
            labels=["worker"],
        )
        for index, pid in sorted(self._worker_pids().items()):
            usage = _process_usage(pid)
            if usage is None:
                continue  # gone between the listing and the read
            label = [str(index)]
            cpu.add_metric(label, usage[0])
            rss.add_metric(label, usage[1])
            fds.add_metric(label, usage[2])
        yield from (cpu, rss, fds)
        if self._worker_places is not None:
            places = GaugeMetricFamily(
                "ferrous_worker_up",
                "Live engine workers (1 each), by where they run: local, or ray:<node>.",
                labels=["worker", "where"],
            )
            for index, where in sorted(self._worker_places().items()):
                places.add_metric([str(index), where], 1.0)
            yield places


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _process_usage(pid: int) -> tuple[float, float, float] | None:
    """(CPU seconds, resident bytes, open fds) of ``pid`` from /proc; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as f:
            resident = int(f.read().split()[1]) * _PAGE
        open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError, ValueError):
        return None
    # Fields after the command name: state is [0], utime [11], stime [12] (proc(5)).
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS
    return cpu, float(resident), float(open_fds)
