"""Engine workers as Ray actors, on the cluster's nodes that have what they need.

``[engine] placement = "ray"`` (install ``ferrousforge[ray]``): the gateway
joins the Ray cluster at ``[ray] address`` as a driver and starts each engine
worker as an actor, placed by Ray on a node offering ``[ray] num_cpus`` and
``[ray] resources`` (a custom resource pins workers to the nodes that declare
it, e.g. ``{"llm": 1}`` on the machines with the models). The actor runs the
ordinary worker loop on a thread of its own, which connects back to the
gateway over TCP (:mod:`engine.remote`): Ray places and supervises, and the
tokens never go through Ray's object store (one Ray call per token would cost
about a millisecond of CPU); they flow over that connection with the same
frames and flow control as a local worker's.

A worker that dies (its actor killed, its node gone) drops its connection: its
generations end with a retryable ``engine_error`` and the pool starts a
replacement actor, wherever Ray finds room, as it replaces a local worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

__all__ = ["RayHost"]

log = logging.getLogger("ferrous.engine")


def _actor_class() -> Any:
    import ray

    remote: Any = ray.remote  # its overloads do not type a decorated class

    @remote(max_restarts=0, max_concurrency=4)
    class EngineWorker:
        """One engine worker: its loop on a thread, connected back to the gateway."""

        def __init__(self) -> None:
            self._thread: Any = None

        def start(self, address: str, nonce: str) -> dict[str, Any]:
            import os
            import threading

            from engine.worker import serve_remote

            self._thread = threading.Thread(
                target=serve_remote, args=(address, nonce), name="engine-worker", daemon=True
            )
            self._thread.start()
            context = ray.get_runtime_context()
            return {"pid": os.getpid(), "node": context.get_node_id()}

        def running(self) -> bool:
            return self._thread is not None and self._thread.is_alive()

    return EngineWorker


class _ActorProcess:
    """A worker actor as the pool sees a process (see :class:`engine.remote.RemoteProcess`)."""

    def __init__(self, actor: Any, pid: int, node: str) -> None:
        self.actor = actor
        self.pid = pid
        self.node = node
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        """Until the worker's loop ended (it was told to stop, or lost its gateway), then
        the actor goes too."""
        while self._returncode is None:
            try:
                if not await self.actor.running.remote():
                    break
            except Exception:  # the actor is dead already
                break
            await asyncio.sleep(0.2)
        self.kill()
        return self._returncode or 0

    def kill(self) -> None:
        import ray

        if self._returncode is None:
            self._returncode = -9
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)


class RayHost:
    """The :class:`~engine.remote.WorkerHost` of a Ray cluster (see the module)."""

    def __init__(
        self,
        address: str,
        *,
        advertise: str,
        num_cpus: float = 1.0,
        resources: dict[str, float] | None = None,
        namespace: str = "ferrous",
    ) -> None:
        self.address = address
        self.advertise = advertise
        self._num_cpus = num_cpus
        self._resources = dict(resources or {})
        self._namespace = namespace
        self._cls: Any = None

    def _connect(self) -> Any:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.address or None,
                namespace=self._namespace,
                log_to_driver=False,
                configure_logging=False,
            )
        if self._cls is None:
            self._cls = _actor_class()
        return self._cls

    async def launch(self, index: int, address: str, nonce: str) -> _ActorProcess:
        cls = await asyncio.to_thread(self._connect)
        actor = cls.options(
            num_cpus=self._num_cpus,
            resources=self._resources,
            name=None,
        ).remote()
        info = await actor.start.remote(address, nonce)
        log.info("worker %d placed on Ray node %s (pid %d)", index, info["node"], info["pid"])
        return _ActorProcess(actor, int(info["pid"]), str(info["node"]))

    def describe(self, proc: Any) -> str:
        return f"ray:{getattr(proc, 'node', '?')}"

    async def close(self) -> None:
        """Leave the cluster (this process joined it as a driver)."""
        import ray

        if self._cls is not None and ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)
