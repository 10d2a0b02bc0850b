"""The Llama decoder graph, built from float32 weights in Hugging Face layout.

:func:`build_decoder_onnx` writes the graph both the tiny test decoder
(:mod:`engine.onnx.tinydecoder`) and the GGUF converter
(:mod:`engine.onnx.convert`) use, with the Optimum / onnxruntime-genai input
and output names (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``;
KV shape [batch, kv_heads, seq, head_dim]) and dynamic batch, sequence and
past dimensions. Weights are keyed by their GGUF tensor names
(``blk.{i}.attn_q.weight`` ...), [out, in], q and k in rotate-half order.

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

The faster graph onnxruntime's fused contrib ops allow is
:mod:`engine.onnx.fused`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from engine.onnx.graph import MS_DOMAIN, GraphBuilder
from engine.onnx.quant import QUANTIZE_MODES, matmul_q4

__all__ = ["TinyDecoderSpec", "build_decoder_onnx", "hf_config", "rope_tables"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TinyDecoderSpec:
    """Shape of a Llama decoder; the defaults are the tiny test decoder's.

    The GGUF converter fills one in from a model's metadata. For the tiny
    decoder ``vocab_size`` is the BPE training target (at most 902).

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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rope_tables(spec: TinyDecoderSpec) -> tuple[F32, F32]:
    """cos and sin, [n_ctx, head_dim/2], for rotate-half rope."""
    d = spec.head_dim
    inv_freq = spec.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(spec.n_ctx, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


_B, _S, _P, _T = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def _rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    if g.opset >= 23:
        return g.op("RMSNormalization", [x, weight], axis=-1, epsilon=eps)
    sq = g.op("Mul", [x, x])
    if g.opset >= 18:
        mean = g.op("ReduceMean", [sq, g.ints(-1)], keepdims=1)
    else:
        mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [mean, g.f32("rms_eps", eps)])])
    return g.op("Mul", [g.op("Div", [x, rms]), weight])


def _rope_plain(g: GraphBuilder, x: str, n_heads: int, spec: TinyDecoderSpec) -> str:
    """Rotate-half rope of [B, S, n_heads·D] with the gathered tables [B, S, 1, D/2]."""
    d = spec.head_dim
    x4 = g.op("Reshape", [x, g.ints(0, 0, n_heads, d)])
    x1 = g.op("Slice", [x4, g.ints(0), g.ints(d // 2), g.ints(-1)])
    x2 = g.op("Slice", [x4, g.ints(d // 2), g.ints(d), g.ints(-1)])
    cos, sin = "rope.cos_bs", "rope.sin_bs"
    real = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
    imag = g.op("Add", [g.op("Mul", [x1, sin]), g.op("Mul", [x2, cos])])
    rotated = g.op("Concat", [real, imag], axis=-1)
    return g.op("Reshape", [rotated, g.ints(0, 0, n_heads * d)])


def _attention_mask(g: GraphBuilder) -> str:
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
    g: GraphBuilder, q: str, k: str, v: str, mask: str, layer: int, spec: TinyDecoderSpec
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
    weight quantized by :func:`engine.onnx.quant.quantize_q4` (4-bit, symmetric, blocks of 32
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
    g = GraphBuilder(opset)
    cos, sin = rope_tables(spec)
    g.const("rope.cos", cos, np.float32)
    g.const("rope.sin", sin, np.float32)

    def matmul(x: str, name: str) -> str:
        if quantize == "q4":
            return matmul_q4(g, x, name, weights[name])
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
        hn = _rms_norm(g, x, vec(p + "attn_norm.weight"), spec.rms_eps)
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
            q = _rope_plain(g, q, h, spec)
            k = _rope_plain(g, k, kv, spec)
            attn = _attention_plain(g, q, k, v, mask, i, spec)
        x = g.op("Add", [x, matmul(attn, p + "attn_output.weight")])
        hn = _rms_norm(g, x, vec(p + "ffn_norm.weight"), spec.rms_eps)
        gate = matmul(hn, p + "ffn_gate.weight")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        up = matmul(hn, p + "ffn_up.weight")
        x = g.op("Add", [x, matmul(g.op("Mul", [act, up]), p + "ffn_down.weight")])
    hn = _rms_norm(g, x, vec("output_norm.weight"), spec.rms_eps)
    if quantize == "q4":
        matmul_q4(g, hn, "output.weight", weights["output.weight"], output="logits")
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
    graph = g.graph("tiny_llama_decoder", inputs, outputs)
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
