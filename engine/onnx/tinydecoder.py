"""A deterministic tiny Llama decoder written both as ONNX and as GGUF from the same weights.

The ONNX backend needs a real decoder to test against that loads in
milliseconds and needs no download, and a way to check it against the engine
we already trust. :func:`write_tiny_decoder` writes one model folder:

* ``model.onnx`` — a Llama-architecture decoder built with ``onnx.helper`` and
  numpy, with the Optimum / onnxruntime-genai input and output names
  (``input_ids``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``;
  KV shape [batch, kv_heads, seq, head_dim]) and dynamic batch, sequence and
  past dimensions;
* ``tokenizer.json`` — a byte-level BPE trained with ``tokenizers`` on a fixed
  English text in this module, with ``<|endoftext|>``, ``<|im_start|>`` and
  ``<|im_end|>`` as ids 0, 1, 2; plus ``tokenizer_config.json`` (ChatML
  template), ``config.json`` (Hugging Face ``llama``) and
  ``generation_config.json``;
* ``model.gguf`` — the same f32 weights for llama.cpp, with the tokenizer as a
  GGUF ``gpt2`` BPE (pre-tokenizer ``gpt-2``, the same regex as the
  ``tokenizers`` ByteLevel pre-tokenizer), so both tokenize identically.

Graph ops: with ``opset`` 23 or 24 the graph uses the native
``RMSNormalization``, ``RotaryEmbedding`` (rotate-half, 3-D input with
``position_ids``) and ``Attention`` (3-D Q/K/V with ``q_num_heads`` /
``kv_num_heads`` for grouped-query attention, ``past_key``/``past_value`` in,
``present_key``/``present_value`` out, a boolean mask); onnxruntime 1.32 has
CPU kernels for all three (checked against numpy; they stay single nodes after
graph optimisation), so no fallback is needed there. With ``opset`` 17 to 22
(where those ops do not exist) the same model is written with plain ops:
Mul/ReduceMean/Sqrt/Div norms, an explicit rotate-half rope from gathered
cos/sin tables, and MatMul + Softmax attention over the
concatenated cache. Opset 25+ is refused: ``Attention``-25 has no CPU kernel in
onnxruntime 1.32 and is expanded into ~60 plain nodes (checked).

The attention mask is built in the graph from ``attention_mask`` [batch,
past+seq]: key slot ``j`` is visible to the query in slot ``past + i`` when
``j <= past + i`` and ``attention_mask[b, j] == 1``. Causality is by cache slot
and the rope angle by ``position_ids``, so rows padded on the left or the right
(and caches with padding holes) give the same logits as each row alone. Every
query also sees its own slot, so padded rows never have an empty softmax.
Callers must send at least one new token per run (``Attention`` refuses an
empty query) and positions below ``n_ctx`` (the rope tables' length; both
paths raise rather than read out of range).

llama.cpp's ``llama`` architecture ropes adjacent pairs where the ONNX graph
rotates halves: the GGUF gets q and k rows permuted exactly as llama.cpp's
Hugging Face converter does (with the kv head count for k).

Weights are seeded numpy normals; the LM head is scaled up
(:attr:`TinyDecoderSpec.logit_scale`) so greedy decoding has clear top-2
margins (random heads otherwise give near-ties that make two engines disagree
on rounding alone). Scaling cannot remove near-ties entirely (the argmax is a
continuous function's), so comparisons should still check the margin of each
step they rely on. The same seed and spec always give byte-identical files.

Run as a command: ``python -m engine.onnx.tinydecoder FOLDER [--seed N] [--opset N] [--q4] [--fused]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from engine.tinymodels import CHATML_TEMPLATE

__all__ = [
    "CORPUS",
    "LINEAR_WEIGHTS",
    "Q4_BLOCK",
    "QUANTIZE_MODES",
    "SPECIAL_TOKENS",
    "TinyDecoderSpec",
    "build_decoder_onnx",
    "decoder_weights",
    "dequantize_q4",
    "main",
    "quantize_q4",
    "train_tiny_tokenizer",
    "write_tiny_decoder",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, PAD_ID = 0, 2, 0  # <|endoftext|> starts and pads; <|im_end|> ends a turn

# llama.cpp token types (gguf.TokenType): 1 normal, 3 control.
_NORMAL, _CONTROL = 1, 3

# The BPE training text: written for this module, plain English with numbers,
# contractions and punctuation so the merges cover what tests type.
CORPUS = """\
The small town sat at the bend of a slow river, and every morning the baker opened his shop \
before the sun was up. He made bread, rolls and a few sweet cakes, and the smell of them \
drifted down the street to the station. People said it was the best bread in the valley.
On Monday the weather was cold and grey. It rained in the morning, but by the afternoon the \
clouds had broken and the light came back over the hills. Children walked home from school \
along the water, throwing stones and counting how many times each one skipped: three, four, \
seven, twelve.
"Where are you going?" asked the old woman at the corner. "To the market," said the boy. \
"My mother needs eggs, milk, butter and two pounds of apples." She smiled and told him to \
come back before dark, because the road was long and the lamps were not yet lit.
The library opened at 9:30 and closed at 17:00. It held about 4,500 books, a room of maps, \
and a reading table by the window where the light was good. The librarian kept a list of \
every book that went out and every book that came back, and she was rarely wrong.
A computer is a machine that follows instructions. It reads a program, stores numbers in \
its memory, and changes them one step at a time. Some programs answer questions, some draw \
pictures, and some simply wait for the next message to arrive. When a model writes text, it \
picks one token after another, each time choosing the word that seems most likely to come \
next.
Don't forget: the meeting starts at ten o'clock, and we'll need the report, the notes and \
the new plan. If you can't come, please send a message; they're expecting everyone. What \
would you like to eat later? I think we should try the new place near the park.
In the summer the fields turned gold and the farmers worked from dawn until the evening. \
They cut the wheat, tied it in bundles and carried it to the barn. At night they sat outside, \
talking about the harvest, the price of grain and the long winter that would follow.
The teacher wrote a question on the board: what is the difference between a river and a \
stream? One student said a river is bigger. Another said a stream is faster. The teacher \
said that both answers were good ones, and that the best answer is often a careful one.
Hello, world! This is a test. This is only a test. Please read the first line, then the \
second line, and then write your answer below. Thank you for your time and your help.
"""


@dataclass(frozen=True)
class TinyDecoderSpec:
    """Shape of the tiny decoder. ``vocab_size`` is the BPE training target (at most 902).

    ``logit_scale`` multiplies the LM head's ``1/sqrt(n_embd)`` init scale. At
    the default (16) the logits have a standard deviation of about 16 and the
    top-2 margin has a median of ~3.7; 0.15% of random contexts and 4 of 912
    greedy steps (38 prompts) measured below 0.01, while onnxruntime and
    llama.cpp differ by at most ~4e-5. Margins scale linearly with it.
    """

    vocab_size: int = 448
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_ff: int = 256
    n_ctx: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    logit_scale: float = 16.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd must be a multiple of n_head with an even head size")
        if self.n_head % self.n_kv_head:
            raise ValueError("n_head must be a multiple of n_kv_head")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError("vocab_size must hold the 256 byte tokens and the special tokens")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ---------------------------------------------------------------------------
# Tokenizer


def train_tiny_tokenizer(vocab_size: int = TinyDecoderSpec.vocab_size) -> Tokenizer:
    """Train the byte-level BPE on :data:`CORPUS` (deterministic, ~10 ms)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise ValueError(f"the corpus yields a vocabulary of {got} tokens, not {vocab_size}")
    return tok


def _vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    """Tokens in id order and merges as ``"a b"`` strings, from the tokenizer's JSON."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    tokens = [""] * tok.get_vocab_size()
    for piece, idx in vocab.items():
        tokens[idx] = piece
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
    if "" in tokens:
        raise ValueError("the tokenizer's ids are not contiguous")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


# ---------------------------------------------------------------------------
# Weights


def decoder_weights(spec: TinyDecoderSpec, seed: int = 0) -> dict[str, F32]:
    """Seeded weights in Hugging Face layout ([out, in]) under GGUF tensor names.

    q and k are *not* permuted here (rotate-half order); :func:`_gguf_tensors`
    permutes them for llama.cpp. Norm weights are ``1 + 0.1·N(0, 1)`` rather
    than ones so a missing or misplaced norm scale shows up in comparisons.
    """
    rng = np.random.default_rng(seed)
    e, f, d = spec.n_embd, spec.n_ff, spec.head_dim
    q_dim, kv_dim = spec.n_head * d, spec.n_kv_head * d

    def normal(*shape: int, scale: float) -> F32:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm() -> F32:
        return (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)

    w: dict[str, F32] = {"token_embd.weight": normal(spec.vocab_size, e, scale=1.0)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm()
        w[p + "attn_q.weight"] = normal(q_dim, e, scale=1.0 / math.sqrt(e))
        w[p + "attn_k.weight"] = normal(kv_dim, e, scale=1.0 / math.sqrt(e))
        w[p + "attn_v.weight"] = normal(kv_dim, e, scale=1.0 / math.sqrt(e))
        w[p + "attn_output.weight"] = normal(e, q_dim, scale=1.0 / math.sqrt(q_dim))
        w[p + "ffn_norm.weight"] = norm()
        w[p + "ffn_gate.weight"] = normal(f, e, scale=1.0 / math.sqrt(e))
        w[p + "ffn_up.weight"] = normal(f, e, scale=1.0 / math.sqrt(e))
        w[p + "ffn_down.weight"] = normal(e, f, scale=1.0 / math.sqrt(f))
    w["output_norm.weight"] = norm()
    w["output.weight"] = normal(spec.vocab_size, e, scale=spec.logit_scale / math.sqrt(e))
    return w


def _permute_for_llama_cpp(w: F32, n_head: int) -> F32:
    """Reorder each head's rows from rotate-half pairs (i, i+d/2) to adjacent pairs (2i, 2i+1)."""
    rows, cols = w.shape
    out = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    return np.ascontiguousarray(out)


def _gguf_tensors(weights: dict[str, F32], spec: TinyDecoderSpec) -> dict[str, F32]:
    out = dict(weights)
    for i in range(spec.n_layer):
        q, k = f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"
        out[q] = _permute_for_llama_cpp(weights[q], spec.n_head)
        out[k] = _permute_for_llama_cpp(weights[k], spec.n_kv_head)
    return out


def _rope_tables(spec: TinyDecoderSpec) -> tuple[F32, F32]:
    """cos and sin, [n_ctx, head_dim/2], for rotate-half rope."""
    d = spec.head_dim
    inv_freq = spec.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(spec.n_ctx, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ---------------------------------------------------------------------------
# 4-bit block quantization (onnxruntime's com.microsoft MatMulNBits layout)

Q4_BLOCK = 32
MS_DOMAIN = "com.microsoft"
QUANTIZE_MODES = (None, "q4")
# The linear projections that ``quantize="q4"`` turns into MatMulNBits, per layer.
LINEAR_WEIGHTS = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def quantize_q4(w: npt.ArrayLike, block: int = Q4_BLOCK) -> tuple[U8, F32]:
    """Symmetric 4-bit block quantization of a [N, K] (out, in) weight for ``MatMulNBits``.

    Returns ``B`` uint8 [N, ceil(K/block), block/2] and ``scales`` float32
    [N, ceil(K/block)]: each block of ``block`` consecutive k values of one
    output row shares a scale; ``q = clip(round(w / scale) + 8, 0, 15)`` with
    the implicit zero point 8, and the value of largest magnitude maps to -8
    (llama.cpp's Q4_0 rule: ``scale = that value / -8``, so scales may be
    negative). Even k goes in the low nibble, odd k in the high nibble. A K
    that is not a multiple of ``block`` is padded with zeros (q = 8).
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, not {block}")
    a = np.asarray(w, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] weight, got shape {a.shape}")
    n, k = a.shape
    n_blocks = -(-k // block)
    if n_blocks * block != k:
        a = np.pad(a, ((0, 0), (0, n_blocks * block - k)))
    blocks = a.reshape(n, n_blocks, block)
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
    scales = (extreme / -8.0).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)
    q = np.clip(np.rint(blocks / safe[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales)


def dequantize_q4(packed: npt.ArrayLike, scales: npt.ArrayLike, k: int | None = None) -> F32:
    """The [N, K] float32 weight that ``MatMulNBits`` multiplies by (inverse of :func:`quantize_q4`).

    ``k`` trims the zero padding of a K that is not a multiple of the block.
    """
    b = np.asarray(packed, dtype=np.uint8)
    s = np.asarray(scales, dtype=np.float32)
    n, n_blocks, half = b.shape
    q = np.empty((n, n_blocks, 2 * half), dtype=np.int8)
    q[..., 0::2] = b & 0x0F
    q[..., 1::2] = b >> 4
    w = ((q.astype(np.float32) - 8.0) * s[..., None]).reshape(n, n_blocks * 2 * half)
    return np.ascontiguousarray(w[:, :k] if k is not None else w)


# ---------------------------------------------------------------------------
# ONNX graph

_B, _S, _P, _T = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


class _Graph:
    """Collects nodes and initializers with unique, readable names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._count = 0

    def const(self, name: str, value: npt.ArrayLike, dtype: type[np.generic]) -> str:
        """An initializer, added on first use (later calls with the same name reuse it)."""
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant."""
        return self.const("const.i64_" + "_".join(str(v) for v in values), list(values), np.int64)

    def scalar(self, value: int) -> str:
        return self.const(f"const.i64_scalar_{value}", value, np.int64)

    def f32(self, name: str, value: float) -> str:
        return self.const(f"const.{name}", value, np.float32)

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        """A one-output node; returns the output's generated name."""
        name = f"{op_type}_{self._count}"
        self.out(op_type, inputs, [f"{name}/out"], **attrs)
        return f"{name}/out"

    def out(
        self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any
    ) -> None:
        """A node with given output names (graph outputs, shared tensors)."""
        name = f"{op_type}_{self._count}"
        self._count += 1
        self.nodes.append(
            helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)
        )

    # -- plain building blocks ------------------------------------------------

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        if self.opset >= 23:
            return self.op("RMSNormalization", [x, weight], axis=-1, epsilon=eps)
        sq = self.op("Mul", [x, x])
        if self.opset >= 18:
            mean = self.op("ReduceMean", [sq, self.ints(-1)], keepdims=1)
        else:
            mean = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [mean, self.f32("rms_eps", eps)])])
        return self.op("Mul", [self.op("Div", [x, rms]), weight])

    def rope_plain(self, x: str, n_heads: int, spec: TinyDecoderSpec) -> str:
        """Rotate-half rope of [B, S, n_heads·D] with the gathered tables [B, S, 1, D/2]."""
        d = spec.head_dim
        x4 = self.op("Reshape", [x, self.ints(0, 0, n_heads, d)])
        x1 = self.op("Slice", [x4, self.ints(0), self.ints(d // 2), self.ints(-1)])
        x2 = self.op("Slice", [x4, self.ints(d // 2), self.ints(d), self.ints(-1)])
        cos, sin = "rope.cos_bs", "rope.sin_bs"
        real = self.op("Sub", [self.op("Mul", [x1, cos]), self.op("Mul", [x2, sin])])
        imag = self.op("Add", [self.op("Mul", [x1, sin]), self.op("Mul", [x2, cos])])
        rotated = self.op("Concat", [real, imag], axis=-1)
        return self.op("Reshape", [rotated, self.ints(0, 0, n_heads * d)])


def _attention_mask(g: _Graph) -> str:
    """Boolean [B, 1, S, T]: causal by cache slot, padding from attention_mask, own slot always."""
    total = g.op("Squeeze", [g.op("Shape", ["attention_mask"], start=1, end=2), g.ints(0)])
    seq = g.op("Squeeze", [g.op("Shape", ["input_ids"], start=1, end=2), g.ints(0)])
    past = g.op("Sub", [total, seq])
    key_slot = g.op("Range", [g.scalar(0), total, g.scalar(1)])  # [T]
    query_slot = g.op("Unsqueeze", [g.op("Range", [past, total, g.scalar(1)]), g.ints(1)])  # [S, 1]
    causal = g.op("LessOrEqual", [key_slot, query_slot])  # [S, T]
    own = g.op("Equal", [key_slot, query_slot])  # [S, T]
    valid = g.op("Cast", ["attention_mask"], to=TensorProto.BOOL)  # [B, T]
    valid = g.op("Unsqueeze", [valid, g.ints(1, 2)])  # [B, 1, 1, T]
    return g.op("Or", [g.op("And", [causal, valid]), own])


def _attention_plain(
    g: _Graph, q: str, k: str, v: str, mask: str, layer: int, spec: TinyDecoderSpec
) -> str:
    """MatMul + Softmax attention; q/k are roped [B, S, ·]; writes present.{layer}.*."""
    h, kv, d = spec.n_head, spec.n_kv_head, spec.head_dim
    to_heads = [0, 2, 1, 3]
    q4 = g.op("Transpose", [g.op("Reshape", [q, g.ints(0, 0, h, d)])], perm=to_heads)  # [B,H,S,D]
    k4 = g.op("Transpose", [g.op("Reshape", [k, g.ints(0, 0, kv, d)])], perm=to_heads)  # [B,KV,S,D]
    v4 = g.op("Transpose", [g.op("Reshape", [v, g.ints(0, 0, kv, d)])], perm=to_heads)
    present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
    g.out("Concat", [f"past_key_values.{layer}.key", k4], [present_k], axis=2)  # [B,KV,T,D]
    g.out("Concat", [f"past_key_values.{layer}.value", v4], [present_v], axis=2)
    # Grouped-query attention without copying the cache: query head h = kv·G + g.
    qg = g.op("Reshape", [q4, g.ints(0, kv, h // kv, -1, d)])
    kt = g.op("Transpose", [g.op("Unsqueeze", [present_k, g.ints(2)])], perm=[0, 1, 2, 4, 3])
    scores = g.op(
        "Mul", [g.op("MatMul", [qg, kt]), g.f32("attn_scale", 1.0 / math.sqrt(d))]
    )  # [B,KV,G,S,T]
    mask5 = g.op("Unsqueeze", [mask, g.ints(1)])  # [B,1,1,S,T]
    scores = g.op("Where", [mask5, scores, g.f32("neg_inf", -math.inf)])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [present_v, g.ints(2)])])  # [B,KV,G,S,D]
    ctx = g.op("Reshape", [ctx, g.ints(0, h, -1, d)])
    ctx = g.op("Transpose", [ctx], perm=to_heads)  # [B,S,H,D]
    return g.op("Reshape", [ctx, g.ints(0, 0, h * d)])


def build_decoder_onnx(
    weights: dict[str, F32],
    spec: TinyDecoderSpec,
    *,
    opset: int = 23,
    quantize: str | None = None,
) -> onnx.ModelProto:
    """The decoder graph for ``weights`` (see the module docstring for the ops per opset).

    ``quantize="q4"`` writes every linear projection (q, k, v, o, gate, up,
    down and the LM head) as a ``com.microsoft`` ``MatMulNBits`` node with the
    weight quantized by :func:`quantize_q4` (4-bit, symmetric, blocks of 32
    along K, no zero points) and ``accuracy_level=4`` (int8 activations).
    The embedding table and the norms stay float32. ``None`` (the default)
    writes plain float32 ``MatMul`` nodes.
    """
    if not 17 <= opset <= 24:
        raise ValueError(f"opset must be 17..24, not {opset} (Attention-25 has no CPU kernel)")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or 'q4', not {quantize!r}")
    native = opset >= 23
    h, kv, d = spec.n_head, spec.n_kv_head, spec.head_dim
    g = _Graph(opset)
    cos, sin = _rope_tables(spec)
    g.const("rope.cos", cos, np.float32)
    g.const("rope.sin", sin, np.float32)

    def matmul(x: str, name: str) -> str:
        if quantize == "q4":
            return _matmul_q4(g, x, name, weights[name])
        # Stored as [in, out] so the graph multiplies without a Transpose.
        init = g.const(name.removesuffix(".weight") + ".weight_t", weights[name].T, np.float32)
        return g.op("MatMul", [x, init])

    def vec(name: str) -> str:
        return g.const(name, weights[name], np.float32)

    mask = _attention_mask(g)
    if not native:
        for table in ("cos", "sin"):
            gathered = g.op("Gather", [f"rope.{table}", "position_ids"])  # [B, S, D/2]
            g.out("Unsqueeze", [gathered, g.ints(2)], [f"rope.{table}_bs"])  # [B, S, 1, D/2]

    x = g.op(
        "Gather",
        [g.const("token_embd.weight", weights["token_embd.weight"], np.float32), "input_ids"],
    )
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        hn = g.rms_norm(x, vec(p + "attn_norm.weight"), spec.rms_eps)
        q = matmul(hn, p + "attn_q.weight")
        k = matmul(hn, p + "attn_k.weight")
        v = matmul(hn, p + "attn_v.weight")
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        if native:
            rope_in = ["rope.cos", "rope.sin", "position_ids"]
            q = g.op("RotaryEmbedding", [q, *rope_in], num_heads=h)
            k = g.op("RotaryEmbedding", [k, *rope_in], num_heads=kv)
            attn = f"blk.{i}.attention"
            outs = [attn, f"present.{i}.key", f"present.{i}.value"]
            g.out(
                "Attention", [q, k, v, mask, past_k, past_v], outs, q_num_heads=h, kv_num_heads=kv
            )
        else:
            q = g.rope_plain(q, h, spec)
            k = g.rope_plain(k, kv, spec)
            attn = _attention_plain(g, q, k, v, mask, i, spec)
        x = g.op("Add", [x, matmul(attn, p + "attn_output.weight")])
        hn = g.rms_norm(x, vec(p + "ffn_norm.weight"), spec.rms_eps)
        gate = matmul(hn, p + "ffn_gate.weight")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        up = matmul(hn, p + "ffn_up.weight")
        x = g.op("Add", [x, matmul(g.op("Mul", [act, up]), p + "ffn_down.weight")])
    hn = g.rms_norm(x, vec("output_norm.weight"), spec.rms_eps)
    if quantize == "q4":
        _matmul_q4(g, hn, "output.weight", weights["output.weight"], output="logits")
    else:
        g.out(
            "MatMul",
            [hn, g.const("output.weight_t", weights["output.weight"].T, np.float32)],
            ["logits"],
        )

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, [_B, _S]),
        helper.make_tensor_value_info("attention_mask", i64, [_B, _T]),
        helper.make_tensor_value_info("position_ids", i64, [_B, _S]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [_B, _S, spec.vocab_size])]
    for i in range(spec.n_layer):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, [_B, kv, _P, d])
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", f32, [_B, kv, _T, d])
            )
    graph = helper.make_graph(g.nodes, "tiny_llama_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", opset)]
    ir_version = helper.find_min_ir_version_for(opsets)
    if quantize is not None:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="ferrousforge",
        ir_version=ir_version,
    )
    return model


def _matmul_q4(g: _Graph, x: str, name: str, w: F32, output: str | None = None) -> str:
    """``x @ w.T`` as one 4-bit ``MatMulNBits`` node (``w`` is [N, K]: out by in)."""
    n, k = (int(d) for d in np.shape(w))
    packed, scales = quantize_q4(w)
    base = name.removesuffix(".weight")
    inputs = [
        x,
        g.const(base + ".weight_q4", packed, np.uint8),
        g.const(base + ".weight_scales", scales, np.float32),
    ]
    attrs: dict[str, Any] = {
        "K": k,
        "N": n,
        "bits": 4,
        "block_size": Q4_BLOCK,
        "accuracy_level": 4,
        "domain": MS_DOMAIN,
    }
    if output is None:
        return g.op("MatMulNBits", inputs, **attrs)
    g.out("MatMulNBits", inputs, [output], **attrs)
    return output


# ---------------------------------------------------------------------------
# Files


def _dump_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_config(
    spec: TinyDecoderSpec, *, tied: bool, bos: int | None, eos: int | None, pad: int | None
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for a Llama decoder of ``spec``'s shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.n_embd,
        "intermediate_size": spec.n_ff,
        "num_hidden_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "num_key_value_heads": spec.n_kv_head,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.n_ctx,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": spec.vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _hf_files(folder: Path, spec: TinyDecoderSpec, tokens: list[str]) -> None:
    config = hf_config(spec, tied=False, bos=BOS_ID, eos=EOS_ID, pad=PAD_ID)
    _dump_json(folder / "config.json", config)
    _dump_json(
        folder / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "pad_token_id": PAD_ID},
    )
    added = {
        str(i): {
            "content": tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i in range(len(SPECIAL_TOKENS))
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": tokens[BOS_ID],
        "eos_token": tokens[EOS_ID],
        "pad_token": tokens[PAD_ID],
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.n_ctx,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _dump_json(folder / "tokenizer_config.json", tokenizer_config)


def _write_gguf(
    path: Path,
    weights: dict[str, F32],
    spec: TinyDecoderSpec,
    tokens: list[str],
    merges: list[str],
    name: str,
) -> None:
    import gguf  # heavy import, only needed here

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_kv_head)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    n_special = len(SPECIAL_TOKENS)
    writer.add_token_types([_CONTROL] * n_special + [_NORMAL] * (len(tokens) - n_special))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for tname, arr in _gguf_tensors(weights, spec).items():
        writer.add_tensor(tname, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_decoder(
    folder: str | os.PathLike[str],
    *,
    seed: int = 0,
    spec: TinyDecoderSpec | None = None,
    opset: int = 23,
    quantize: str | None = None,
    fused: bool = False,
) -> Path:
    """Write the model folder (see the module docstring) and return it.

    The same ``seed``, ``spec``, ``opset`` and ``quantize`` always write the
    same bytes; the tokenizer depends on ``spec.vocab_size`` only.
    ``quantize="q4"`` writes ``model.onnx`` with 4-bit ``MatMulNBits``
    projections (see :func:`build_decoder_onnx`); ``model.gguf`` stays f32.
    ``fused`` writes the graph of :func:`engine.onnx.fused.build_fused_decoder`
    instead (``opset`` ignored). Files are written under temporary names and
    renamed, so a reader never sees half a file.
    """
    spec = spec or TinyDecoderSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(spec.vocab_size)
    weights = decoder_weights(spec, seed)
    if fused:
        from engine.onnx.fused import build_fused_decoder  # it builds on this module

        model = build_fused_decoder(weights, spec, quantize=quantize)
    else:
        model = build_decoder_onnx(weights, spec, opset=opset, quantize=quantize)

    with tempfile.TemporaryDirectory(dir=folder, prefix=".staging-") as tmp:
        _write_files(Path(tmp), folder, spec, seed, tok, weights, model)
    return folder


def _write_files(
    staging: Path,
    folder: Path,
    spec: TinyDecoderSpec,
    seed: int,
    tok: Tokenizer,
    weights: dict[str, F32],
    model: onnx.ModelProto,
) -> None:
    tokens, merges = _vocab_and_merges(tok)
    (staging / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _hf_files(staging, spec, tokens)
    (staging / "model.onnx").write_bytes(model.SerializeToString())
    _write_gguf(staging / "model.gguf", weights, spec, tokens, merges, f"tiny-decoder-s{seed}")
    for item in sorted(staging.iterdir()):
        os.replace(item, folder / item.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.onnx.tinydecoder",
        description="Write a tiny Llama decoder as ONNX and GGUF (same weights) with its tokenizer.",
    )
    parser.add_argument("folder", type=Path, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opset", type=int, default=23, help="23-24 native ops, 17-22 plain ops")
    parser.add_argument(
        "--q4", action="store_true", help="4-bit MatMulNBits projections in model.onnx"
    )
    parser.add_argument(
        "--fused", action="store_true", help="fused contrib ops and a KV cache shared in place"
    )
    args = parser.parse_args(argv)
    folder = write_tiny_decoder(
        args.folder,
        seed=args.seed,
        opset=args.opset,
        quantize="q4" if args.q4 else None,
        fused=args.fused,
    )
    for item in sorted(folder.iterdir()):
        print(f"{item} ({item.stat().st_size} bytes)")
    spec = asdict(TinyDecoderSpec())
    print(json.dumps(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
