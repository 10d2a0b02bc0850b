"""Prefix reuse in the ONNX backend: prompts that start like an earlier or a running sequence.

The keys and values of the shared leading tokens are copied instead of
computed. Checked on the tiny decoder in float32 (plain graph, copied cache;
fused graph, shared buffer): the greedy tokens with reuse equal those without,
for a repeated prompt, a prompt sharing part of a finished one and a prompt
sharing part of one still running; the store keeps to its budget; and
through a real server the WebSocket ``done``, the OpenAI ``usage`` and the
metrics report the reused tokens.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.backends.base import LoadParams
from engine.backends.onnx_entry import OnnxOptions
from engine.backends.onnxkv import PrefixStore
from engine.backends.onnxrt import MIN_REUSE, OnnxBackend
from engine.onnx.tinydecoder import write_tiny_decoder
from engine.requests import SamplingParams
from gateway.config import AuthConfig, OnnxConfig
from protocol import messages as m

from .gateway_helpers import client, gateway, server_config

FIRST = "The small town sat by the river and the people of the town walked to the market"
SHARES_HALF = "The small town sat by the river and the children played in the water all day"
OTHER = "A quiet evening came over the hills while the birds sang"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module", params=["plain", "fused"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    fused = request.param == "fused"
    return write_tiny_decoder(tmp_path_factory.mktemp(request.param) / "tiny", fused=fused)


def _load(folder: Path, prefix_cache_mb: int, reuse: bool = True) -> OnnxBackend:
    onnx = OnnxOptions(prefix_cache_mb=prefix_cache_mb, prefix_reuse=reuse)
    params = LoadParams(n_threads=1, n_seq=4, options=onnx)
    backend = OnnxBackend.load(str(folder), params)
    assert isinstance(backend, OnnxBackend)
    return backend


def _generate(backend: OnnxBackend, seq: int, prompt: str, n: int) -> tuple[list[int], int]:
    """(greedy tokens, prompt tokens reused) of one sequence run alone."""
    backend.start(seq, backend.tokenize(prompt, add_bos=False), greedy(n))
    out = [backend.step([seq])[seq] for _ in range(n)]
    reused = backend.prompt_reused(seq)
    backend.finish(seq)
    return out, reused


def test_reuse_after_finish_gives_the_tokens_of_a_full_read(tiny: Path) -> None:
    cold = _load(tiny, prefix_cache_mb=0)
    want = {p: _generate(cold, i, p, 16)[0] for i, p in enumerate((FIRST, SHARES_HALF, OTHER))}
    assert cold.reused_tokens == 0  # nothing kept, nothing running beside them

    warm = _load(tiny, prefix_cache_mb=64)
    n_first = len(warm.tokenize(FIRST, add_bos=False))
    first, half = warm.tokenize(FIRST, add_bos=False), warm.tokenize(SHARES_HALF, add_bos=False)
    shared = next(i for i, (a, b) in enumerate(zip(first, half, strict=False)) if a != b)
    assert shared >= MIN_REUSE
    assert _generate(warm, 0, FIRST, 16) == (want[FIRST], 0)
    # The same prompt again: everything but its last token is copied.
    assert _generate(warm, 1, FIRST, 16) == (want[FIRST], n_first - 1)
    # A prompt sharing its first part: that part is copied, the rest read after it.
    assert _generate(warm, 2, SHARES_HALF, 16) == (want[SHARES_HALF], shared)
    # Nothing in common: read in full.
    assert _generate(warm, 3, OTHER, 16) == (want[OTHER], 0)
    assert warm.reused_tokens == n_first - 1 + shared


def test_a_waiting_prompt_copies_from_a_running_sequence(tiny: Path) -> None:
    want = {p: _generate(_load(tiny, 0), 0, p, 12)[0] for p in (FIRST, SHARES_HALF)}
    backend = _load(tiny, prefix_cache_mb=0)  # no store: only the running row can be the source
    backend.start(0, backend.tokenize(FIRST, add_bos=False), greedy(12))
    backend.start(1, backend.tokenize(SHARES_HALF, add_bos=False), greedy(12))
    got: dict[int, list[int]] = {0: [], 1: []}
    while any(len(v) < 12 for v in got.values()):
        for seq, token in backend.step([s for s, v in got.items() if len(v) < 12]).items():
            got[seq].append(token)
    assert backend.prompt_reused(0) == 0  # read first, alone
    assert backend.prompt_reused(1) >= MIN_REUSE  # then copied from row 0 while it ran
    assert got == {0: want[FIRST], 1: want[SHARES_HALF]}
    backend.free()


def test_reuse_can_be_turned_off(tiny: Path) -> None:
    backend = _load(tiny, prefix_cache_mb=64, reuse=False)
    first = _generate(backend, 0, FIRST, 8)
    assert _generate(backend, 1, FIRST, 8) == (first[0], 0)
    backend.start(2, backend.tokenize(FIRST, add_bos=False), greedy(4))
    backend.start(3, backend.tokenize(FIRST, add_bos=False), greedy(4))
    for _ in range(4):
        backend.step([2, 3])
    assert backend.prompt_reused(2) == backend.prompt_reused(3) == 0
    assert backend.reused_tokens == 0
    backend.free()


def test_the_store_keeps_to_its_budget_and_drops_covered_entries() -> None:
    def kv(n: int) -> list[np.ndarray]:
        return [np.zeros((2, n, 8), dtype=np.float32) for _ in range(4)]  # 256 bytes a token

    store = PrefixStore(budget=256 * 100)
    a = np.arange(40, dtype=np.int64)
    store.add(a[:20], kv(20))
    store.add(a, kv(40))  # covers the first: it goes
    assert len(store) == 1 and store.bytes == 256 * 40
    store.add(a[:30], kv(30))  # covered by the one kept: not added
    assert len(store) == 1
    b = np.arange(100, 150, dtype=np.int64)
    store.add(b, kv(50))
    assert len(store) == 2 and store.bytes == 256 * 90
    c = np.arange(200, 230, dtype=np.int64)
    store.add(c, kv(30))  # over budget: the least recently used (a) goes
    assert len(store) == 2 and store.bytes == 256 * 80
    assert store.best(a[:10])[0] == 0
    assert store.best(np.concatenate([b[:12], c]))[0] == 12
    store.add(np.arange(1000, dtype=np.int64), kv(1000))  # larger than the budget: never kept
    assert store.bytes == 256 * 80
    store.clear()
    assert len(store) == 0 and store.bytes == 0


async def test_served_generations_report_cached_tokens(tmp_path: Path) -> None:
    model = write_tiny_decoder(tmp_path / "tiny", fused=True)
    config = server_config(
        tmp_path / "home",
        {"tiny": model},
        onnx=OnnxConfig(prefix_cache_mb=16),
        auth=AuthConfig(enabled=False),
    )
    options = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=10, ignore_eos=True)
    async with gateway(config) as running:
        async with client(running, None) as c:
            texts, cached = [], []
            for i in range(2):
                await c.send(m.Generate(f"g{i}", "tiny", FIRST, options))
                deltas, done, _ = await c.until_done(f"g{i}")
                assert done.finish_reason == "length", done
                assert done.usage is not None
                texts.append("".join(d.text for d in deltas))
                cached.append(done.usage.cached_tokens)
        assert cached[0] == 0 and cached[1] >= MIN_REUSE
        assert texts[0] == texts[1]
        async with httpx.AsyncClient(base_url=running.http_url) as http:
            r = await http.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": FIRST, "max_tokens": 4, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            details = r.json()["usage"]["prompt_tokens_details"]
            assert details["cached_tokens"] >= MIN_REUSE
            metrics = (await http.get("/metrics")).text
        line = next(x for x in metrics.splitlines() if x.startswith("ferrous_prompt_tokens_cached"))
        assert float(line.split()[-1]) >= 2 * MIN_REUSE
