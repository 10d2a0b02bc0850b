"""4-bit block quantization for onnxruntime's ``MatMulNBits`` (``com.microsoft``).

The decoder graphs (:mod:`engine.onnx.decoder`, :mod:`engine.onnx.fused`) and
the GGUF converter (:mod:`engine.onnx.convert`) can write every linear
projection as a 4-bit ``MatMulNBits`` node: a quarter of float32's size and
onnxruntime's fastest CPU matmul for one token at a time. This module holds
the weight layout that op reads (:func:`quantize_q4`), its inverse for tests
and for lookups that need float rows (:func:`dequantize_q4`), and the node
itself (:func:`matmul_q4`).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from engine.onnx.graph import MS_DOMAIN, GraphBuilder

__all__ = [
    "LINEAR_WEIGHTS",
    "Q4_BLOCK",
    "QUANTIZE_MODES",
    "dequantize_q4",
    "matmul_q4",
    "quantize_q4",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

Q4_BLOCK: Final = 32
QUANTIZE_MODES: Final = (None, "q4")
# The linear projections that ``quantize="q4"`` turns into MatMulNBits, per layer.
LINEAR_WEIGHTS: Final = (
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


def matmul_q4(g: GraphBuilder, x: str, name: str, w: F32, output: str | None = None) -> str:
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
    return g.op("MatMulNBits", inputs, output=output, **attrs)
