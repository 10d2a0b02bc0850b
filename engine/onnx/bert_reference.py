"""An independent float64 numpy forward pass of a BERT encoder, to cross-check the ONNX graph.

:func:`numpy_bert_forward` computes sentence vectors from a sentence-transformers
folder's weights without any graph: unpacked weights, an explicit
1/sqrt(d) score scale, libm ``erf`` for GELU, one text at a time (so no
padding), the same pooling and truncation. Tests compare
:class:`engine.onnx.encoder.OnnxEncoder` against it; it is meant for that,
not for speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine.onnx.bert import load_tokenizer, read_config, read_pooling, read_weights

__all__ = ["numpy_bert_forward"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


_erf = np.frompyfunc(math.erf, 1, 1)  # libm erf, element by element: exact, slow, fine here


def _gelu(u: F64) -> F64:
    erf: F64 = np.asarray(_erf(u / math.sqrt(2.0)), dtype=np.float64)
    return 0.5 * u * (1.0 + erf)


def _layer_norm(x: F64, weight: F32, bias: F32, eps: float) -> F64:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    out: F64 = (x - mu) / np.sqrt(var + eps) * weight + bias
    return out


def numpy_bert_forward(src: Path, texts: Sequence[str]) -> F32:
    """Sentence vectors of ``texts`` from the BERT folder ``src`` in float64 numpy.

    Independent of the ONNX graph: unpacked weights, explicit 1/sqrt(d) score
    scale, libm ``erf`` for GELU, one text at a time (no padding), the same
    pooling and truncation. Meant for cross-checking, not speed.
    """
    src = Path(src)
    cfg = read_config(src)
    w = read_weights(src, cfg)
    pooling = read_pooling(src, cfg)
    tok = load_tokenizer(src / "tokenizer.json", pooling.max_seq_length)
    nh, hd, eps = cfg.num_heads, cfg.head_dim, cfg.layer_norm_eps
    out = np.zeros((len(texts), cfg.hidden_size), np.float32)
    for row, text in enumerate(texts):
        enc = tok.encode(text)
        ids = np.array(enc.ids, np.int64)
        types = np.array(enc.type_ids, np.int64)
        s = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids].astype(np.float64)
            + w["embeddings.position_embeddings.weight"][:s]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        for n in range(cfg.num_layers):
            p = f"encoder.layer.{n}."

            def linear(v: F64, name: str, p: str = p) -> F64:
                weight = w[p + name + ".weight"].astype(np.float64)
                result: F64 = v @ weight.T + w[p + name + ".bias"]
                return result

            def heads(v: F64, s: int = s) -> F64:
                return v.reshape(s, nh, hd).transpose(1, 0, 2)

            q = heads(linear(x, "attention.self.query"))
            k = heads(linear(x, "attention.self.key"))
            v = heads(linear(x, "attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(s, cfg.hidden_size)
            x = _layer_norm(
                linear(ctx, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                eps,
            )
            gelu = _gelu(linear(x, "intermediate.dense"))
            x = _layer_norm(
                linear(gelu, "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
                eps,
            )
        out[row] = pooling.apply(x[None], np.ones((1, s), np.int64))[0]
    return out
