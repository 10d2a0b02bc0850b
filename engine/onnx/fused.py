"""The fast decoder graph: onnxruntime's fused CPU contrib ops and a KV cache shared in place.

:func:`build_fused_decoder` writes the same Llama decoder as
:func:`engine.onnx.decoder.build_decoder_onnx` (same weights, same
logits up to float rounding) with the ops onnxruntime-genai's model builder
emits for CPU, because they are what makes a small decoder fast on
onnxruntime:

* ``SimplifiedLayerNormalization`` for the first norm, then
  ``SkipSimplifiedLayerNormalization`` (``com.microsoft``) for every later one:
  the residual add and the RMS norm in one kernel, the sum (output 3) carried
  on as the next residual;
* one packed q/k/v projection per layer (N = (heads + 2 · kv_heads) · head_dim)
  feeding ``GroupQueryAttention`` (``com.microsoft``) with built-in rotary
  (``do_rotary=1``, rotate-half, cos/sin caches [n_ctx, head_dim/2]);
* ``MatMulNBits`` 4-bit projections (``accuracy_level=4``: int8 activations
  on AVX2 machines; the LM head too) when ``quantize="q4"``, float32
  ``MatMul`` otherwise; SiLU as ``Sigmoid`` · ``Mul``;
* the LM head applied to the last position only: ``logits`` is
  [batch, 1, vocab] (a prompt of 500 tokens does not pay for 500 LM-head
  rows; the backend only ever samples from the last one).

Inputs are ``input_ids`` [batch, seq] and ``attention_mask`` [batch, total];
``past_key_values.{i}.key|value`` and ``present.{i}.key|value`` are
[batch, kv_heads, capacity, head_dim]. ``GroupQueryAttention`` reads each
row's length from the mask, **right-padded**: row ``b`` holds
``sum(mask[b])`` valid positions at the start of its cache, its new tokens
go right after them, and its rotary positions continue from there
(``seqlens_k`` = ``sum(mask) - 1``, ``total_sequence_length`` = mask width).
When the caller binds one buffer as both past and present through IOBinding
(same shape, same memory), the kernel appends to it in place: no per-step
copy of the cache, which is what the backend does
(:class:`engine.backends.onnxrt.OnnxBackend`, "shared-buffer" mode, chosen
when the graph holds a ``GroupQueryAttention`` node).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from engine.onnx.decoder import TinyDecoderSpec, rope_tables
from engine.onnx.graph import MS_DOMAIN, GraphBuilder
from engine.onnx.quant import Q4_BLOCK, QUANTIZE_MODES, matmul_q4, quantize_q4

__all__ = ["FUSED_OPSET", "build_fused_decoder", "packed_qkv"]

F32 = npt.NDArray[np.float32]

FUSED_OPSET = 21  # any opset works: the heavy ops are com.microsoft ones

_B, _S, _T, _C = "batch_size", "sequence_length", "total_sequence_length", "kv_capacity"


def packed_qkv(weights: dict[str, F32], layer: int) -> F32:
    """The [(h + 2·kv)·d, n_embd] weight of layer ``layer``'s packed q/k/v projection."""
    p = f"blk.{layer}."
    return np.ascontiguousarray(
        np.concatenate(
            [
                weights[p + "attn_q.weight"],
                weights[p + "attn_k.weight"],
                weights[p + "attn_v.weight"],
            ]
        ),
        dtype=np.float32,
    )


def build_fused_decoder(
    weights: dict[str, F32],
    spec: TinyDecoderSpec,
    *,
    quantize: str | None = "q4",
    tied: bool = False,
) -> onnx.ModelProto:
    """The fused decoder graph for ``weights`` (Hugging Face layout: [out, in], rotate-half q/k).

    ``tied`` (the LM head is the embedding table) with ``quantize="q4"``
    stores the table once, 4-bit: the LM head's ``MatMulNBits`` weight also
    feeds a ``GatherBlockQuantized`` embedding lookup (same packed bytes,
    zero point 8), so ``token_embd.weight`` is not used. For SmolLM2 this
    drops the float32 table (113 MB) from the file.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or 'q4', not {quantize!r}")
    h, kv, d = spec.n_head, spec.n_kv_head, spec.head_dim
    eps = spec.rms_eps
    g = GraphBuilder(FUSED_OPSET)
    cos, sin = rope_tables(spec)
    g.const("rope.cos_cache", cos, np.float32)
    g.const("rope.sin_cache", sin, np.float32)

    def linear(x: str, name: str, w: F32, output: str | None = None) -> str:
        if quantize == "q4":
            return matmul_q4(g, x, name, w, output)
        init = g.const(name.removesuffix(".weight") + ".weight_t", w.T, np.float32)
        return g.op("MatMul", [x, init], output=output)

    def vec(name: str) -> str:
        return g.const(name, weights[name], np.float32)

    # Per-row lengths for GroupQueryAttention, from the right-padded mask.
    lengths = g.op("ReduceSum", ["attention_mask", g.ints(1)], keepdims=0)  # [B]
    seqlens_k = g.op("Cast", [g.op("Sub", [lengths, g.ints(1)])], to=TensorProto.INT32)
    width = g.op("Shape", ["attention_mask"], start=1, end=2)  # [1]
    total = g.op("Cast", [g.op("Squeeze", [width, g.ints(0)])], to=TensorProto.INT32)  # scalar

    if tied and quantize == "q4":
        x = _quantized_embedding(g, weights["output.weight"], spec)
    else:
        x = g.op(
            "Gather",
            [g.const("token_embd.weight", weights["token_embd.weight"], np.float32), "input_ids"],
        )
    hn = g.op(
        "SimplifiedLayerNormalization",
        [x, vec("blk.0.attn_norm.weight")],
        axis=-1,
        epsilon=eps,
        stash_type=1,
    )
    residual = x
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        qkv = linear(hn, p + "attn_qkv.weight", packed_qkv(weights, i))
        attn = f"{p}attention"
        g.out(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                seqlens_k,
                total,
                "rope.cos_cache",
                "rope.sin_cache",
            ],
            [attn, f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            num_heads=h,
            kv_num_heads=kv,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(1.0 / np.sqrt(d)),
        )
        o = linear(attn, p + "attn_output.weight", weights[p + "attn_output.weight"])
        hn, residual = _skip_norm(g, o, residual, vec(p + "ffn_norm.weight"), eps)
        gate = linear(hn, p + "ffn_gate.weight", weights[p + "ffn_gate.weight"])
        up = linear(hn, p + "ffn_up.weight", weights[p + "ffn_up.weight"])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        down = linear(act, p + "ffn_down.weight", weights[p + "ffn_down.weight"])
        after = f"blk.{i + 1}.attn_norm.weight" if i + 1 < spec.n_layer else "output_norm.weight"
        hn, residual = _skip_norm(g, down, residual, vec(after), eps)
    # Only the last position goes through the LM head.
    last = g.op("Slice", [hn, g.ints(-1), g.ints(2**62), g.ints(1)])
    linear(last, "output.weight", weights["output.weight"], output="logits")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, [_B, _S]),
        helper.make_tensor_value_info("attention_mask", i64, [_B, _T]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [_B, 1, spec.vocab_size])]
    for i in range(spec.n_layer):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, [_B, kv, _C, d])
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", f32, [_B, kv, _C, d])
            )
    graph = g.graph("llama_decoder_fused", inputs, outputs)
    opsets = [helper.make_opsetid("", FUSED_OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="ferrousforge",
        ir_version=helper.find_min_ir_version_for(opsets[:1]),
    )


def _quantized_embedding(g: GraphBuilder, head: F32, spec: TinyDecoderSpec) -> str:
    """Rows of the 4-bit LM head weight as the embedding lookup, [B, S, n_embd].

    The packed bytes are the ``output.weight_q4`` initializer the LM head's
    ``MatMulNBits`` reads ([vocab, K/32, 16]); ``GatherBlockQuantized`` takes
    them as they are with the block axis last (scales [vocab, K/32, 1]).
    """
    packed, scales = quantize_q4(head)
    data = g.const("output.weight_q4", packed, np.uint8)
    scales3 = g.const("output.weight_scales_gather", scales[..., None], np.float32)
    rows = g.op(
        "GatherBlockQuantized",
        [data, "input_ids", scales3],
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=2,
        block_size=Q4_BLOCK,
        bits=4,
    )  # [B, S, K/32, 32]
    return g.op("Reshape", [rows, g.ints(0, 0, spec.n_embd)])


def _skip_norm(g: GraphBuilder, x: str, skip: str, gamma: str, eps: float) -> tuple[str, str]:
    """``norm(x + skip)`` and ``x + skip`` (the next residual) from one fused node."""
    name = g.next_name("SkipSimplifiedLayerNormalization")
    normed, summed = f"{name}/out", f"{name}/sum"
    attrs: dict[str, Any] = {"epsilon": eps, "domain": MS_DOMAIN}
    g.out("SkipSimplifiedLayerNormalization", [x, skip, gamma], [normed, "", "", summed], **attrs)
    return normed, summed
