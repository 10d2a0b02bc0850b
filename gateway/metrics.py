"""Prometheus metrics of one gateway (its own registry, so several can live in one process)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
            "Time from a generate/chat message to its first delta sent.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ferrous_inter_token_latency_seconds",
            "Time between consecutive deltas of one generation.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ferrous_tokens_generated", "Completion tokens generated.", registry=r
        )
        self.cached_tokens = Counter(
            "ferrous_prompt_tokens_cached",
            "Prompt tokens whose keys and values were copied from a cached prefix instead of read.",
            registry=r,
        )
        self.sessions = Gauge("ferrous_active_sessions", "Open WebSocket sessions.", registry=r)
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
            "quota; overloaded: the model's queue is full), tenant and model.",
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
            "Time a generation waited for a sequence slot of its model, by model.",
            ["model"],
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
