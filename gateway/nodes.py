"""The nodes of a deployment: who is up, by heartbeat.

Every node of a deployment that shares state writes its heartbeat (the time
on the shared store's clock, so the nodes' own clocks do not matter) every
``[state] heartbeat`` seconds; a node whose last beat is older than
``[state] dead_after`` is taken for dead. A node that another node's session
was running on is checked here before that session is taken over
(:mod:`gateway.redissessions`); the admin's ``/readyz`` lists the nodes.

:class:`LocalNodes` is the one-node default: this node, always alive.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Protocol

import msgspec

__all__ = ["LocalNodes", "NodeInfo", "NodeRegistry", "default_node_id"]


class NodeInfo(msgspec.Struct, frozen=True):
    """A node as the registry knows it: ``age`` seconds since its last heartbeat."""

    id: str
    age: float
    alive: bool
    started: float = 0.0
    version: str = ""


def default_node_id() -> str:
    """A name unique to this process: host, process id and a random part (a restarted
    node is a new node; its predecessor's sessions are taken over like any dead node's)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class NodeRegistry(Protocol):
    node_id: str
    #: Seconds without a heartbeat after which a node is taken for dead.
    dead_after: float

    async def start(self) -> None:
        """Announce this node and keep its heartbeat going."""

    async def age(self, node_id: str) -> float | None:
        """Seconds since ``node_id``'s last heartbeat; None when it never beat or left."""

    async def nodes(self) -> list[NodeInfo]:
        """Every node known, this one included."""

    async def close(self) -> None:
        """Leave: the others no longer count this node."""


class LocalNodes:
    """One node, nothing shared."""

    def __init__(self, node_id: str | None = None, version: str = "") -> None:
        self.node_id = node_id or default_node_id()
        self.dead_after = float("inf")
        self._started = time.time()
        self._version = version

    async def start(self) -> None:
        return None

    async def age(self, node_id: str) -> float | None:
        return 0.0 if node_id == self.node_id else None

    async def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(self.node_id, 0.0, True, self._started, self._version)]

    async def close(self) -> None:
        return None
