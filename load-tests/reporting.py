"""Reporting: per-generation numbers as locust request events, failures by error code.

Every row is ``<scenario> <metric>`` under a type naming the transport; see
``locustfile.py`` for the metrics. :func:`wait_for_final_csv` is a locust
event listener, registered by ``locustfile.py``.
"""

from __future__ import annotations

import csv
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from locust.env import Environment


class LoadFailure(Exception):
    """A failure as locust shows it: its repr is the error code alone.

    Locust groups failures by ``repr(exception)``; server messages carry
    numbers (``the prompt has 402 tokens``), so only the code is kept and the
    failures table reads as a count per code.
    """

    def __repr__(self) -> str:
        return str(self.args[0]) if self.args else "failure"

    __str__ = __repr__


class Reporter:
    """Fires locust request events for one transport and scenario."""

    def __init__(self, environment: Environment, kind: str, scenario: str) -> None:
        self.environment = environment
        self.kind = kind
        self.scenario = scenario

    def fire(self, metric: str, value: float, length: int = 0, failure: str | None = None) -> None:
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]  # locust
            request_type=self.kind,
            name=f"{self.scenario} {metric}",
            response_time=value,
            response_length=length,
            exception=LoadFailure(failure) if failure else None,
            context={},
        )


def ms(seconds: float) -> float:
    return seconds * 1000.0


@dataclass
class Generation:
    """What a client saw of one generation, timed on the client's clock."""

    sent: float
    deltas: list[float] = field(default_factory=list)  # arrival time of each delta with text
    text_bytes: int = 0
    completion_tokens: int = 0
    finish: str | None = None  # done.finish_reason, or None when it ended otherwise
    failure: str | None = None  # error code / close / timeout, when it failed
    end: float = 0.0
    cancelled_at: float | None = None
    deltas_after_cancel: int = 0

    def report(self, rep: Reporter, *, expect_cancel: bool = False, rate: bool = True) -> None:
        """Report this generation's ttft, itl gaps, tokens/s, and its outcome.

        ``rate=False`` leaves out tokens/s, for scenarios whose generations are
        a few tokens long: their deltas arrive in one read, and the rate over
        a near-zero span is noise in the millions.
        """
        if self.deltas:
            rep.fire("ttft", ms(self.deltas[0] - self.sent))
            for a, b in itertools.pairwise(self.deltas):
                rep.fire("itl", ms(b - a))
            span = self.deltas[-1] - self.deltas[0]
            if rate and self.completion_tokens > 1 and span > 0:
                rep.fire("tokens/s", (self.completion_tokens - 1) / span)
        failure = self.failure
        if failure is None and self.finish in ("error", "stalled"):
            failure = f"finish {self.finish}"
        if failure is None and self.finish == "cancelled" and not expect_cancel:
            failure = "finish cancelled"
        rep.fire("generation", ms(self.end - self.sent), self.text_bytes, failure)


def wait_for_final_csv(environment: Environment, **_: Any) -> None:
    """Hold the shutdown until the ``--csv`` stats file on disk has the final totals.

    Locust writes the CSV files from a greenlet once a second and takes no last
    snapshot at exit, so the end of a run (seconds of it on a busy machine)
    can be missing from the CSV while the printed summary has it. Each
    snapshot is written whole before that greenlet sleeps again, so once the
    ``Aggregated`` row matches the final count the failures file is final too.
    """
    o = environment.parsed_options
    prefix = getattr(o, "csv_prefix", None) if o is not None else None
    if not prefix:
        return
    path = f"{prefix}_stats.csv"
    want = str(environment.stats.total.num_requests)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(path, newline="") as f:
                if any(
                    r.get("Name") == "Aggregated" and r.get("Request Count") == want
                    for r in csv.DictReader(f)
                ):
                    return
        except OSError:
            pass
        time.sleep(0.1)  # cooperative: the CSV writer's greenlet runs meanwhile
