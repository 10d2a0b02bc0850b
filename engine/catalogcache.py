"""A catalog model pulled once into a shared cache store, for scripts, benchmarks and tests.

``ferrous pull NAME`` fills a server's own store; a benchmark or a test suite
wants the same folder without a server: :func:`fetch_catalog_model` pulls
``NAME`` from the built-in catalog (the same sources, digests and folder
completion as ``ferrous pull``) into ``FERROUS_HOME/cache/catalog`` once, under a
file lock so concurrent processes share one pull, and returns its path.

Command: ``python -m engine.catalogcache NAME`` prints the path.
"""

from __future__ import annotations

import asyncio
import fcntl
import sys
from pathlib import Path

from engine.smollm2 import ferrous_home
from engine.store.pull import ModelManager
from engine.store.store import ModelStore

__all__ = ["fetch_catalog_model", "main"]


def fetch_catalog_model(name: str, cache_dir: Path | None = None) -> Path:
    """The path of catalog model ``name``, pulled on first use."""
    root = (cache_dir or ferrous_home() / "cache") / "catalog"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manager = ModelManager(ModelStore(root))
        record = manager.store.find(name) or asyncio.run(manager.pull(name))
        return manager.store.model_path(record)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m engine.catalogcache NAME", file=sys.stderr)
        return 2
    print(fetch_catalog_model(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
