"""4-bit ``MatMulNBits`` decoder graphs: packing, one node, the tiny decoder, SmolLM2.

``quantize="q4"`` turns every linear projection into onnxruntime's
``com.microsoft`` ``MatMulNBits`` (4-bit symmetric blocks of 32 along K, zero
point 8, ``accuracy_level=4`` = int8 activations). The packing is checked
against a numpy dequantisation and against onnxruntime itself; the tiny
decoder's 4-bit graph must stay close to its float32 graph, and the 4-bit
SmolLM2 conversion (the run's shared fast graph, whose projections are all
4-bit) must still answer the capital question in a real pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

from engine import ChatMessage, EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.onnx.convert import convert_gguf, main
from engine.onnx.decoder import TinyDecoderSpec, build_decoder_onnx
from engine.onnx.quant import LINEAR_WEIGHTS, Q4_BLOCK, dequantize_q4, quantize_q4
from engine.onnx.tinydecoder import decoder_weights, write_tiny_decoder

from .conftest import SmolLM2Onnx, collect

F32 = npt.NDArray[np.float32]
SPEC = TinyDecoderSpec()
PROMPTS = ("Hello, world! This is", "In the summer the fields", "The library opened at")
STEPS = 8


def _session(model: str | bytes, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _last_logits(sess: ort.InferenceSession, ids: Sequence[int]) -> F32:
    feeds: dict[str, Any] = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    out = sess.run(["logits"], feeds)[0]
    return np.asarray(out[0, -1], dtype=np.float32)


def _greedy(sess: ort.InferenceSession, ids: Sequence[int], n: int) -> tuple[list[int], F32]:
    """``n`` greedy tokens (recomputed from scratch each step) and the prompt's last logits."""
    seq = list(ids)
    first = _last_logits(sess, seq)
    row = first
    out: list[int] = []
    for _ in range(n):
        out.append(int(row.argmax()))
        seq.append(out[-1])
        row = _last_logits(sess, seq)
    return out, first


# ---------------------------------------------------------------------------
# (a) packing


def test_pack_unpack_round_trip_is_exact_on_the_grid() -> None:
    rng = np.random.default_rng(0)
    n, k = 24, 160
    blocks = k // Q4_BLOCK
    scales = rng.uniform(0.01, 0.5, size=(n, blocks)).astype(np.float32)
    q = rng.integers(0, 16, size=(n, blocks, Q4_BLOCK))
    q[..., 5] = 0  # every block holds -8·scale, so the quantizer recovers the scale exactly
    w = ((q - 8).astype(np.float32) * scales[..., None]).reshape(n, k)

    packed, got_scales = quantize_q4(w)
    assert packed.dtype == np.uint8 and packed.shape == (n, blocks, Q4_BLOCK // 2)
    assert got_scales.dtype == np.float32 and got_scales.shape == (n, blocks)
    np.testing.assert_array_equal(got_scales, scales)
    np.testing.assert_array_equal(dequantize_q4(packed, got_scales), w)
    # Layout: even k in the low nibble, odd k in the high nibble.
    np.testing.assert_array_equal(packed & 0x0F, q[..., 0::2])
    np.testing.assert_array_equal(packed >> 4, q[..., 1::2])

    # Off the grid: rounding errs by at most half a step; only values clipped at +7
    # (the side opposite the block's extreme, which maps to -8) err by up to a step.
    x = rng.standard_normal((n, k)).astype(np.float32)
    p, s = quantize_q4(x)
    step = np.abs(s)[..., None]
    err = np.abs(dequantize_q4(p, s) - x).reshape(n, blocks, Q4_BLOCK)
    assert (err <= step * (1 + 1e-5)).all()
    xb = x.reshape(n, blocks, Q4_BLOCK)
    unclipped = xb / s[..., None] < 7.5
    assert (err[unclipped] <= (step / 2 * (1 + 1e-5) + 1e-7).repeat(Q4_BLOCK, -1)[unclipped]).all()
    # A K that is not a multiple of the block is zero-padded; all-zero blocks are fine.
    y = np.zeros((3, 40), np.float32)
    y[0, :7] = [1, -2, 3, -4, 5, -6, 7]
    p, s = quantize_q4(y)
    assert p.shape == (3, 2, 16)
    np.testing.assert_allclose(dequantize_q4(p, s, k=40), y, atol=0.5)
    assert (dequantize_q4(p, s, k=40)[1:] == 0).all()


# ---------------------------------------------------------------------------
# (b) one MatMulNBits node in onnxruntime


def test_matmulnbits_node_equals_numpy_dequantized_matmul() -> None:
    rng = np.random.default_rng(1)
    k, n = 192, 80
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)  # [out, in]
    packed, scales = quantize_q4(w)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=Q4_BLOCK,
        accuracy_level=4,
    )
    graph = helper.make_graph(
        [node],
        "one_matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")],
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=11)
    onnx.checker.check_model(model)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    got = _session(model.SerializeToString()).run(None, {"A": a})[0]
    want = a @ dequantize_q4(packed, scales).T
    # int8 activations: a relative error of ~1% of the output's scale.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999


# ---------------------------------------------------------------------------
# (c) the tiny decoder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    return {
        "f32": write_tiny_decoder(root / "f32"),
        "q4": write_tiny_decoder(root / "q4", quantize="q4"),
    }


def test_q4_graph_structure() -> None:
    weights = decoder_weights(SPEC, seed=0)
    model = build_decoder_onnx(weights, SPEC, quantize="q4")
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(LINEAR_WEIGHTS) * SPEC.n_layer + 1  # + the LM head
    assert all(n.domain == "com.microsoft" for n in nbits)
    attrs = {a.name: helper.get_attribute_value(a) for a in nbits[-1].attribute}
    assert attrs == {
        "K": SPEC.n_embd,
        "N": SPEC.vocab_size,
        "bits": 4,
        "block_size": 32,
        "accuracy_level": 4,
    }
    assert nbits[-1].output == ["logits"]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 23), ("com.microsoft", 1)}
    # Default: float32 MatMul only, no contrib domain; unknown modes are refused.
    plain = build_decoder_onnx(weights, SPEC)
    assert (
        plain.SerializeToString()
        == build_decoder_onnx(weights, SPEC, quantize=None).SerializeToString()
    )
    assert "MatMulNBits" not in {n.op_type for n in plain.graph.node}
    assert [o.domain for o in plain.opset_import] == [""]
    with pytest.raises(ValueError, match="quantize"):
        build_decoder_onnx(weights, SPEC, quantize="q8")


@pytest.mark.parametrize("opset", [23, 17])
def test_tiny_q4_decoder_tracks_f32(folders: dict[str, Path], opset: int) -> None:
    tok = Tokenizer.from_file(str(folders["f32"] / "tokenizer.json"))
    if opset == 23:
        f32 = _session(str(folders["f32"] / "model.onnx"))
        q4 = _session(str(folders["q4"] / "model.onnx"))
    else:
        weights = decoder_weights(SPEC, seed=0)
        f32 = _session(build_decoder_onnx(weights, SPEC, opset=17).SerializeToString())
        q4 = _session(
            build_decoder_onnx(weights, SPEC, opset=17, quantize="q4").SerializeToString()
        )
    agree = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        a, la = _greedy(f32, ids, STEPS)
        b, lb = _greedy(q4, ids, STEPS)
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), STEPS)
        agree.append(k)
        corr = float(np.corrcoef(la, lb)[0, 1])
        print(f"opset {opset} {prompt!r}: {k}/{STEPS} greedy tokens agree, logit corr {corr:.4f}")
        assert a[0] == b[0], prompt
        assert corr > 0.95, (prompt, corr)
    assert sum(agree) >= len(PROMPTS) * 2


def test_convert_q4_equals_tiny_q4_graph(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GGUF twin converted with --q4 gives the tiny q4 graph's logits (same weights)."""
    dst = tmp_path / "conv-q4"
    assert main([str(folders["f32"] / "model.gguf"), str(dst), "--q4"]) == 0
    assert "model.onnx.data" in capsys.readouterr().out
    assert (dst / "model.onnx").stat().st_size < 100_000  # every weight is external
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 15
    f32_dst = convert_gguf(folders["f32"] / "model.gguf", tmp_path / "conv-f32")
    assert (dst / "model.onnx.data").stat().st_size < (f32_dst / "model.onnx.data").stat().st_size
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    converted, tiny = _session(str(dst / "model.onnx")), _session(str(folders["q4"] / "model.onnx"))
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        diff = np.abs(_last_logits(converted, ids) - _last_logits(tiny, ids)).max()
        assert diff < 1e-3, (prompt, diff)
    with pytest.raises(ValueError, match="quantize"):
        convert_gguf(folders["f32"] / "model.gguf", tmp_path / "bad", quantize="int3")


# ---------------------------------------------------------------------------
# (d) SmolLM2-135M-Instruct, 4-bit, in a real pool

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.mark.smollm2
async def test_smollm2_q4_answers_paris(smollm2_onnx: SmolLM2Onnx) -> None:
    folder = smollm2_onnx()  # converted with quantize="q4" (and the fused ops)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"\nSmolLM2 ONNX q4: {size / 1e6:.0f} MB")
    assert size < 250_000_000
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    n_layer = 30
    linear = n_layer * (len(LINEAR_WEIGHTS) - 2) + 1  # q/k/v packed into one; the LM head
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == linear
    assert not any(n.op_type == "MatMul" for n in graph.node)
    sampling = SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=32)
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("smol-q4", folder)
        request = GenerateRequest(
            model="smol-q4", messages=[ChatMessage("user", QUESTION)], sampling=sampling
        )
        deltas, done = await collect(client, request)
    assert done.error is None, done.error
    text = "".join(d.text for d in deltas)
    print(f"q4 answer: {text!r}; decode {done.timings.decode_tok_s:.1f} tok/s (pool, 1 stream)")
    assert "Paris" in text, text
