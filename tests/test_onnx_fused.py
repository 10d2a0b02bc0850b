"""The fused decoder graph and the backend's shared KV buffer.

:mod:`engine.onnx.fused` writes the Llama decoder with onnxruntime's fused
CPU ops (``SkipSimplifiedLayerNormalization``, packed-QKV
``GroupQueryAttention`` with built-in rotary, ``MatMulNBits``); the backend
binds one buffer per layer as both past and present so the graph appends in
place. Checked here: the fused float32 graph gives the plain graph's logits
(prefill and cached decoding), the fused 4-bit graph tracks it, greedy tokens
through the real pool equal llama.cpp's on the GGUF twin, batched rows equal
rows alone — also when a finished row's slot is refilled by moving another,
when a paused row splits the batch, and when the buffer grows — and SmolLM2
converted to the fast graph answers the capital question.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from engine import ChatMessage, EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.backends import onnxkv, onnxrt
from engine.backends.base import LoadParams
from engine.backends.onnx_entry import OnnxOptions
from engine.backends.onnxrt import OnnxBackend
from engine.onnx.convert import convert_gguf, main
from engine.onnx.decoder import TinyDecoderSpec, build_decoder_onnx
from engine.onnx.fused import build_fused_decoder
from engine.onnx.quant import dequantize_q4, quantize_q4
from engine.onnx.tinydecoder import decoder_weights, write_tiny_decoder

from .conftest import SmolLM2Onnx, collect
from .test_onnx_quant import _last_logits as _plain_logits
from .test_onnx_quant import _session

F32 = npt.NDArray[np.float32]
SPEC = TinyDecoderSpec()
PROMPTS = ["The quick brown fox", "Once upon a time there", "A small model says", "Hello"]


class _Fused:
    """Drives a fused graph the way the backend does: one buffer bound as past and present."""

    def __init__(self, sess: ort.InferenceSession, capacity: int = 64) -> None:
        self.sess = sess
        self.names = [f"{i}.{kind}" for i in range(SPEC.n_layer) for kind in ("key", "value")]
        self.buffers = [
            np.zeros((1, SPEC.n_kv_head, capacity, SPEC.head_dim), dtype=np.float32)
            for _ in self.names
        ]
        self.length = 0

    def feed(self, ids: Sequence[int]) -> F32:
        io = self.sess.io_binding()
        io.bind_output("logits", "cpu")
        io.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        self.length += len(ids)
        io.bind_cpu_input("attention_mask", np.ones((1, self.length), dtype=np.int64))
        for name, buf in zip(self.names, self.buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(f"past_key_values.{name}", value)
            io.bind_ortvalue_output(f"present.{name}", value)
        self.sess.run_with_iobinding(io)
        out = io.get_outputs()[0].numpy()
        assert out.shape == (1, 1, SPEC.vocab_size)
        return np.asarray(out[0, -1], dtype=np.float32)


def test_fused_graph_structure_and_size() -> None:
    weights = decoder_weights(SPEC, 0)
    ops = Counter(n.op_type for n in build_fused_decoder(weights, SPEC).graph.node)
    n = SPEC.n_layer
    assert ops["GroupQueryAttention"] == n
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * n
    assert ops["SimplifiedLayerNormalization"] == 1
    assert ops["MatMulNBits"] == 5 * n + 1  # qkv, o, gate, up, down per layer + LM head
    assert ops["MatMul"] == 0
    f32 = Counter(n.op_type for n in build_fused_decoder(weights, SPEC, quantize=None).graph.node)
    assert f32["MatMul"] == 5 * n + 1 and f32["MatMulNBits"] == 0
    with pytest.raises(ValueError, match="quantize"):
        build_fused_decoder(weights, SPEC, quantize="q2")
    # Deterministic: the same weights give the same bytes.
    assert (
        build_fused_decoder(weights, SPEC).SerializeToString()
        == build_fused_decoder(weights, SPEC).SerializeToString()
    )


def test_fused_graphs_equal_plain_graphs_prefill_and_cached_decode() -> None:
    """Fused f32 = plain f32, and fused 4-bit = plain 4-bit (same quantized weights)."""
    weights = decoder_weights(SPEC, 1)
    worst: dict[str | None, float] = {}
    for quantize in (None, "q4"):
        plain = _session(build_decoder_onnx(weights, SPEC, quantize=quantize).SerializeToString())
        fused = _session(build_fused_decoder(weights, SPEC, quantize=quantize).SerializeToString())
        rng = np.random.default_rng(5)
        worst[quantize] = 0.0
        for _ in range(4):
            ids = [int(x) for x in rng.integers(3, SPEC.vocab_size, size=int(rng.integers(1, 12)))]
            run = _Fused(fused)
            got = run.feed(ids)
            for _step in range(10):
                want = _plain_logits(plain, ids)
                err = float(np.abs(got - want).max() / np.abs(want).max())
                worst[quantize] = max(worst[quantize], err)
                ids.append(int(want.argmax()))
                got = run.feed(ids[-1:])
    print(f"\nfused vs plain, max error relative to the logit range: {worst}")
    assert worst[None] < 1e-5, worst
    # int8 activations are quantized per row block in both; only summation order differs.
    assert worst["q4"] < 1e-3, worst


def test_shared_embedding_is_the_4bit_lm_head() -> None:
    """A tied model's embedding looked up in the 4-bit head = a table of its dequantized rows."""
    base = decoder_weights(SPEC, 2)
    tied = {**base, "token_embd.weight": base["output.weight"]}
    shared = build_fused_decoder(tied, SPEC, quantize="q4", tied=True)
    ops = Counter(n.op_type for n in shared.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    assert "token_embd.weight" not in {i.name for i in shared.graph.initializer}
    packed, scales = quantize_q4(base["output.weight"])
    table = {**tied, "token_embd.weight": dequantize_q4(packed, scales, SPEC.n_embd)}
    reference = build_fused_decoder(table, SPEC, quantize="q4")
    a, b = (
        _Fused(_session(shared.SerializeToString())),
        _Fused(_session(reference.SerializeToString())),
    )
    ids = [5, 17, 99, 200, 31]
    for nxt in (None, 7, 8, 9):
        step = ids if nxt is None else [nxt]
        x, y = a.feed(step), b.feed(step)
        assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max()


@pytest.fixture(scope="module")
def fused_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny decoder, fused float32 graph, with its GGUF twin."""
    return write_tiny_decoder(tmp_path_factory.mktemp("fused") / "tiny", seed=0, fused=True)


@pytest.fixture
async def pool(fused_twin: Path, tmp_path: Path) -> AsyncIterator[EngineClient]:
    folder = tmp_path / "m"
    shutil.copytree(fused_twin, folder, ignore=shutil.ignore_patterns("*.gguf"))
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("onnx", folder)
        await client.load("gguf", fused_twin / "model.gguf")
        yield client


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=n, ignore_eos=True)


async def ids_of(client: EngineClient, model: str, prompt: str, n: int) -> list[int]:
    deltas, done = await collect(
        client, GenerateRequest(model=model, prompt=prompt, sampling=greedy(n), token_ids=True)
    )
    assert done.error is None, done.error
    return [i for d in deltas for i in (d.token_ids or [])]


async def test_fused_backend_agrees_with_llama_cpp_and_batches(pool: EngineClient) -> None:
    alone = {}
    for prompt in PROMPTS[:3]:
        alone[prompt] = await ids_of(pool, "onnx", prompt, 20)
        assert alone[prompt] == await ids_of(pool, "gguf", prompt, 20), prompt
    # Different lengths: the short ones finish first and the last row moves into their slot.
    lengths = [6, 20, 9]
    together = await asyncio.gather(
        *(ids_of(pool, "onnx", p, n) for p, n in zip(PROMPTS[:3], lengths, strict=True))
    )
    for prompt, n, got in zip(PROMPTS[:3], lengths, together, strict=True):
        assert got == alone[prompt][:n], prompt


def _load(folder: Path, n_seq: int = 4) -> OnnxBackend:
    backend = OnnxBackend.load(str(folder), LoadParams(n_threads=1, n_seq=n_seq))
    assert isinstance(backend, OnnxBackend)
    return backend


def _alone(backend: OnnxBackend, prompt: str, n: int) -> list[int]:
    backend.start(99, backend.tokenize(prompt, add_bos=False), greedy(n))
    out = [backend.step([99])[99] for _ in range(n)]
    backend.finish(99)
    return out


def test_shared_buffer_rows_paused_moved_and_grown(
    fused_twin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small first capacity makes the buffer grow (twice) within these generations.
    monkeypatch.setattr(onnxkv, "INITIAL_CAPACITY", 8)
    backend = _load(fused_twin)
    assert backend._shared is not None and backend._shared.capacity == 8
    n = 24
    want = {p: _alone(backend, p, n) for p in PROMPTS}
    for i, p in enumerate(PROMPTS):
        backend.start(i, backend.tokenize(p, add_bos=False), greedy(n))
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}

    def step(seqs: list[int]) -> None:
        for s, tok in backend.step(seqs).items():
            got[s].append(tok)

    for _ in range(8):
        step([0, 1, 2, 3])  # prompts are read one per step, then all decode together
    for _ in range(5):
        step([0, 3])  # 1 and 2 paused: rows 0 and 3 run as two blocks
    while len(got[0]) < 12:
        step([0, 1, 2, 3])
    backend.finish(1)  # row 3's sequence moves into row 1
    while any(len(got[s]) < n for s in (0, 2, 3)):
        step([s for s in (0, 2, 3) if len(got[s]) < n])
    assert backend._shared.capacity >= 32
    assert got[1] == want[PROMPTS[1]][: len(got[1])]
    for s in (0, 2, 3):
        assert got[s] == want[PROMPTS[s]], s
    backend.free()
    assert backend._shared.used_rows() == 0


def test_a_long_prompt_is_read_in_chunks_while_others_decode(
    fused_twin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = LoadParams(n_threads=1, n_seq=4, options=OnnxOptions(prefix_cache_mb=0))
    backend = OnnxBackend.load(str(fused_twin), params)
    assert isinstance(backend, OnnxBackend)
    long_prompt = " ".join(PROMPTS[1:] * 3)  # shares nothing with the running one
    n_long = len(backend.tokenize(long_prompt, add_bos=False))
    want_long = _alone(backend, long_prompt, 10)
    want_short = _alone(backend, PROMPTS[0], 30)
    monkeypatch.setattr(onnxrt, "PROMPT_CHUNK", 4)
    got: dict[int, list[int]] = {0: [], 1: []}

    def step(seqs: list[int]) -> dict[int, int]:
        tokens = backend.step(seqs)
        for s, tok in tokens.items():
            got[s].append(tok)
        return tokens

    backend.start(0, backend.tokenize(PROMPTS[0], add_bos=False), greedy(30))
    while len(got[0]) < 3:
        step([0])
    backend.start(1, backend.tokenize(long_prompt, add_bos=False), greedy(10))
    chunks = -(-n_long // 4)
    assert chunks >= 4
    for i in range(chunks):
        tokens = step([0, 1])
        assert 0 in tokens  # the running stream moves on every step
        assert (1 in tokens) == (i == chunks - 1), i  # the long prompt: 4 tokens a step
        assert backend.context_used(1) == min(4 * (i + 1), n_long)
    while len(got[0]) < 30 or len(got[1]) < 10:
        step([s for s, n in ((0, 30), (1, 10)) if len(got[s]) < n])
    assert got == {0: want_short, 1: want_long}


def test_cli_converts_to_the_fused_graph(fused_twin: Path, tmp_path: Path) -> None:
    dst = tmp_path / "conv"
    assert main([str(fused_twin / "model.gguf"), str(dst), "--fused"]) == 0
    f32 = _load(dst)
    reference = _load(fused_twin)
    for prompt in PROMPTS[:2]:
        assert _alone(f32, prompt, 12) == _alone(reference, prompt, 12)
    q4 = convert_gguf(fused_twin / "model.gguf", tmp_path / "q4", quantize="q4", fused=True)
    size = sum(p.stat().st_size for p in q4.iterdir())
    assert size < sum(p.stat().st_size for p in dst.iterdir())
    assert len(_alone(_load(q4), PROMPTS[0], 8)) == 8


QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.mark.smollm2
async def test_smollm2_fast_graph_answers_paris_alone_and_batched(
    smollm2_onnx: SmolLM2Onnx,
) -> None:
    folder = smollm2_onnx("fast")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 220_000_000, size
    sampling = SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=24)
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=4)
    async with EngineClient(config) as client:
        await client.load("smol", folder)

        def request() -> GenerateRequest:
            return GenerateRequest(
                model="smol", messages=[ChatMessage("user", QUESTION)], sampling=sampling
            )

        deltas, done = await collect(client, request())
        assert done.error is None, done.error
        text = "".join(d.text for d in deltas)
        print(f"\nfast-graph answer: {text!r}; {done.timings.decode_tok_s:.1f} tok/s")
        assert "Paris" in text, text
        results = await asyncio.gather(*(collect(client, request()) for _ in range(4)))
    for deltas, done in results:
        assert done.error is None and "Paris" in "".join(d.text for d in deltas)
    small = smollm2_onnx("fast-shared-embedding")
    size = sum(p.stat().st_size for p in small.iterdir())
    assert size < 100_000_000, size
    async with EngineClient(config) as client:
        await client.load("small", small)
        deltas, done = await collect(
            client,
            GenerateRequest(
                model="small", messages=[ChatMessage("user", QUESTION)], sampling=sampling
            ),
        )
    assert done.error is None and "Paris" in "".join(d.text for d in deltas)


def test_prompts_are_read_in_the_step_plans_order(fused_twin: Path) -> None:
    """The ONNX backend follows engine.stepplan like llama.cpp's: of two prompts that
    arrive together the shorter is read first, and a higher class before both."""
    backend = _load(fused_twin)
    try:
        long = backend.tokenize("Once upon a time there was a " * 6, add_bos=False)
        short = backend.tokenize("The quick brown fox", add_bos=False)
        backend.start(1, long, greedy(4))
        backend.start(2, short, greedy(4))
        assert list(backend.step([1, 2])) == [2]  # the short prompt's first token
        assert sorted(backend.step([1, 2])) == [1, 2]  # then the long one, 2 decoding
        # Prompts no cache holds (a shared prefix would be copied, not read).
        backend.start(3, backend.tokenize("A small model says " * 5, add_bos=False), greedy(4))
        urgent = backend.tokenize("Rain falls on the hills " * 5, add_bos=False)
        backend.start(4, urgent, greedy(4), priority=5)
        assert list(backend.step([1, 2, 3, 4])) == [4]  # a higher class: a step alone
        assert sorted(backend.step([1, 2, 3, 4])) == [1, 2, 3, 4]
    finally:
        backend.free()
