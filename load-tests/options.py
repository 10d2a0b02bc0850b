"""Options of the load scenarios: ``--ferrous-*`` flags and ``LOCUST_FERROUS_*`` variables.

:func:`add_arguments` and :func:`keep_users_with_tasks` are locust event
listeners, registered by ``locustfile.py``; :class:`Settings` is what a user
reads of the parsed options.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from locust.argument_parser import LocustArgumentParser
from locust.env import Environment


def add_arguments(parser: LocustArgumentParser) -> None:
    """Options for these scenarios, also settable as ``LOCUST_FERROUS_*`` environment variables.

    Not ``FERROUS_*``: the server reads every ``FERROUS_*`` variable as configuration and
    refuses unknown ones, so ``FERROUS_TOKEN`` in a shell would stop ``ferrous serve`` there.
    """

    def opt(name: str, **kw: Any) -> None:
        env = "LOCUST_" + name.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(name, env_var=env, **kw)

    opt(
        "--ferrous-token",
        default="",
        is_secret=True,
        help="JWT or API key sent as 'Authorization: Bearer' (empty: none, for --no-auth servers)",
    )
    opt("--ferrous-model", default="", help="model name (default: the first the server lists)")
    opt(
        "--ferrous-encoding",
        default="both",
        choices=("json", "msgpack", "both"),
        help="WebSocket subprotocol; 'both' alternates users between JSON and MessagePack",
    )
    opt("--ferrous-max-tokens", type=int, default=64, help="max_tokens of chat generations")
    opt("--ferrous-think-min", type=float, default=1.0, help="steady/sse think time, lower (s)")
    opt("--ferrous-think-max", type=float, default=3.0, help="steady/sse think time, upper (s)")
    opt("--ferrous-turns", type=int, default=4, help="steady: chat turns before a new conversation")
    opt("--ferrous-cancel-max", type=int, default=32, help="cancel: cancel after 0..N deltas")
    opt("--ferrous-slow-rate", type=int, default=64, help="slow: bytes read per second")
    opt("--ferrous-slow-seconds", type=float, default=10.0, help="slow: how long to read slowly")
    opt("--ferrous-slow-max-tokens", type=int, default=1000, help="slow: max_tokens")
    opt("--ferrous-timeout", type=float, default=60.0, help="seconds without a message = failure")


def keep_users_with_tasks(environment: Environment, **_: Any) -> None:
    """With ``--tags``/``--exclude-tags``, keep only the user classes that still have a task.

    Locust filters tasks by tag but still spawns every class, and a class left
    without tasks spawns users that fail at once; so ``--tags cancel`` would
    also start failing chat users. Same rule as locust's own filter.
    """
    o = environment.parsed_options
    tags = set(o.tags) if o is not None and o.tags else None
    excluded = set(o.exclude_tags) if o is not None and o.exclude_tags else None

    def runs(t: object) -> bool:
        have: set[str] = getattr(t, "locust_tag_set", set())
        return (tags is None or bool(have & tags)) and not (excluded and have & excluded)

    kept = [cls for cls in environment.user_classes if any(runs(t) for t in cls.tasks)]
    if kept:
        environment.user_classes[:] = kept


@dataclass(frozen=True)
class Settings:
    """The parsed options, read once per user."""

    token: str
    model: str
    encoding: str
    max_tokens: int
    think_min: float
    think_max: float
    turns: int
    cancel_max: int
    slow_rate: int
    slow_seconds: float
    slow_max_tokens: int
    timeout: float

    @classmethod
    def of(cls, environment: Environment) -> Settings:
        o = environment.parsed_options
        if o is None:  # locust used as a library: defaults, credentials from the environment
            return cls(
                os.environ.get("LOCUST_FERROUS_TOKEN", ""),
                os.environ.get("LOCUST_FERROUS_MODEL", ""),
                "both",
                *(64, 1.0, 3.0, 4, 32, 64, 10.0, 1000, 60.0),
            )
        return cls(
            o.ferrous_token,
            o.ferrous_model,
            o.ferrous_encoding,
            o.ferrous_max_tokens,
            o.ferrous_think_min,
            o.ferrous_think_max,
            o.ferrous_turns,
            o.ferrous_cancel_max,
            o.ferrous_slow_rate,
            o.ferrous_slow_seconds,
            o.ferrous_slow_max_tokens,
            o.ferrous_timeout,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def think(self) -> float:
        return random.uniform(self.think_min, max(self.think_min, self.think_max))
