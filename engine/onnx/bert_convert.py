"""Convert a sentence-transformers BERT folder into an ONNX encoder folder, without torch.

The project serves embeddings from ONNX models, but the machines it runs on
reach package registries only, never model hubs, and torch is not a
dependency. So :func:`convert_bert` reads a sentence-transformers BERT folder
(safetensors, config, WordPiece ``tokenizer.json``, pooling modules; see
:mod:`engine.onnx.bert`) and writes the folder :class:`engine.onnx.encoder.OnnxEncoder`
runs: ``model.onnx`` built with :class:`engine.onnx.graph.GraphBuilder` from
plain opset-17 operators, weights stored *inside* the ``.onnx`` file (one
file to move or hash; the 2 GB protobuf limit is far above BERT-base sizes),
``tokenizer.json``, ``config.json`` and ``pooling.json``, which tells a
runtime how to turn hidden states into a sentence vector.

Errors in the source folder raise :class:`~protocol.errors.ModelLoadError`
with reason ``missing``, ``unsupported_architecture`` or ``corrupt``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from engine.onnx.bert import (
    ENCODER_FORMAT,
    BertConfig,
    load_tokenizer,
    read_config,
    read_pooling,
    read_weights,
)
from engine.onnx.graph import GraphBuilder
from protocol.errors import ModelLoadError

__all__ = ["OPSET", "convert_bert"]

OPSET: Final = 17  # LayerNormalization arrived in 17; everything else is older
# Additive attention bias for padded keys, as BERT was trained with: exp(-1e4) is 0 in float32.
MASK_BIAS: Final = -1.0e4

F32 = npt.NDArray[np.float32]


def _build_graph(cfg: BertConfig, w: dict[str, F32]) -> onnx.ModelProto:
    g = GraphBuilder(OPSET)
    h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    eps = cfg.layer_norm_eps

    def weight(name: str, key: str, transpose: bool = False) -> str:
        return g.const(name, w[key].T if transpose else w[key], np.float32)

    # Embeddings: word + absolute position (a slice of the table, length = seq) + token type.
    word = g.op(
        "Gather", [weight("word_embeddings", "embeddings.word_embeddings.weight"), "input_ids"]
    )
    seq_len = g.op("Shape", ["input_ids"], start=1, end=2)
    zero = g.const("zero_1d", np.zeros(1), np.int64)
    pos_table = weight("position_embeddings", "embeddings.position_embeddings.weight")
    pos = g.op("Slice", [pos_table, zero, seq_len, zero])
    tt_table = weight("token_type_embeddings", "embeddings.token_type_embeddings.weight")
    tt = g.op("Gather", [tt_table, "token_type_ids"])
    x = g.op("Add", [g.op("Add", [word, pos]), tt])
    x = g.op(
        "LayerNormalization",
        [
            x,
            weight("emb_ln_w", "embeddings.LayerNorm.weight"),
            weight("emb_ln_b", "embeddings.LayerNorm.bias"),
        ],
        axis=-1,
        epsilon=eps,
    )

    # Padding mask -> additive bias [batch, 1, 1, seq] shared by every layer and head.
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    one = g.const("one", [1.0], np.float32)
    bias = g.op("Mul", [g.op("Sub", [one, mask]), g.const("mask_bias", [MASK_BIAS], np.float32)])
    bias = g.op("Unsqueeze", [bias, g.const("axes_1_2", [1, 2], np.int64)])

    qkv_shape = g.const("qkv_shape", [0, 0, 3 * nh, hd], np.int64)
    merge_shape = g.const("merge_shape", [0, 0, h], np.int64)
    head_split = g.const("head_split", [nh, nh, nh], np.int64)
    half = g.const("half", [0.5], np.float32)
    inv_sqrt2 = g.const("inv_sqrt2", [1.0 / math.sqrt(2.0)], np.float32)
    scale = 1.0 / math.sqrt(hd)

    for n in range(cfg.num_layers):
        p = f"encoder.layer.{n}."
        a = f"{p}attention.self."
        # One packed QKV projection; the 1/sqrt(head_dim) score scale is folded into Q.
        wqkv = np.concatenate(
            [w[a + "query.weight"].T * scale, w[a + "key.weight"].T, w[a + "value.weight"].T],
            axis=1,
        )
        bqkv = np.concatenate([w[a + "query.bias"] * scale, w[a + "key.bias"], w[a + "value.bias"]])
        qkv = g.op("MatMul", [x, g.const(f"l{n}_qkv_w", wqkv, np.float32)])
        qkv = g.op("Add", [qkv, g.const(f"l{n}_qkv_b", bqkv, np.float32)])
        qkv = g.op("Transpose", [g.op("Reshape", [qkv, qkv_shape])], perm=[0, 2, 1, 3])
        q, k, v = g.ops("Split", [qkv, head_split], 3, axis=1)  # each [batch, nh, seq, hd]
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_shape])
        attn = g.op("MatMul", [ctx, weight(f"l{n}_o_w", p + "attention.output.dense.weight", True)])
        attn = g.op("Add", [attn, weight(f"l{n}_o_b", p + "attention.output.dense.bias")])
        x = g.op(
            "LayerNormalization",
            [
                g.op("Add", [attn, x]),
                weight(f"l{n}_ln1_w", p + "attention.output.LayerNorm.weight"),
                weight(f"l{n}_ln1_b", p + "attention.output.LayerNorm.bias"),
            ],
            axis=-1,
            epsilon=eps,
        )
        # Feed-forward with exact (erf) GELU: 0.5 * u * (1 + erf(u / sqrt 2)).
        u = g.op("MatMul", [x, weight(f"l{n}_up_w", p + "intermediate.dense.weight", True)])
        u = g.op("Add", [u, weight(f"l{n}_up_b", p + "intermediate.dense.bias")])
        erf = g.op("Erf", [g.op("Mul", [u, inv_sqrt2])])
        gelu = g.op("Mul", [g.op("Mul", [u, half]), g.op("Add", [erf, one])])
        d = g.op("MatMul", [gelu, weight(f"l{n}_down_w", p + "output.dense.weight", True)])
        d = g.op("Add", [d, weight(f"l{n}_down_b", p + "output.dense.bias")])
        last = n == cfg.num_layers - 1
        x = g.op(
            "LayerNormalization",
            [
                g.op("Add", [d, x]),
                weight(f"l{n}_ln2_w", p + "output.LayerNorm.weight"),
                weight(f"l{n}_ln2_b", p + "output.LayerNorm.bias"),
            ],
            output="last_hidden_state" if last else None,
            axis=-1,
            epsilon=eps,
        )
    if cfg.num_layers == 0:
        g.op("Identity", [x], output="last_hidden_state")

    dims = ["batch", "sequence"]
    graph = g.graph(
        "bert_encoder",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, dims)
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, h])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ferrousforge"
    )
    model.ir_version = 8  # opset 17's IR version; readable by every onnxruntime since 1.13
    model.doc_string = "BERT encoder converted from safetensors by engine.onnx.bert_convert"
    return model


def _replaceable(folder: Path) -> bool:
    """An existing destination may be replaced only if empty or an encoder we wrote."""
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        return bool(json.loads((folder / "pooling.json").read_text())["format"] == ENCODER_FORMAT)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_bert(src: Path, dst: Path) -> Path:
    """Convert the sentence-transformers BERT folder ``src`` into an ONNX encoder folder ``dst``.

    ``dst`` gets ``model.onnx`` (weights embedded), ``tokenizer.json`` and
    ``config.json`` (copied) and ``pooling.json`` (pooling mode, normalisation,
    maximum sequence length). It is written next to its final place and renamed
    in; an existing ``dst`` is replaced only if it is empty or a previous
    conversion. Raises ModelLoadError if ``src`` is not a usable BERT folder.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ModelLoadError(str(src), "missing", "not a directory")
    cfg = read_config(src)
    weights = read_weights(src, cfg)
    pooling = read_pooling(src, cfg)
    load_tokenizer(src / "tokenizer.json", None)  # fail now, not when the encoder loads
    model = _build_graph(cfg, weights)
    onnx.checker.check_model(model)
    if dst.exists() and not _replaceable(dst):
        raise FileExistsError(f"{dst} exists and is not an ONNX encoder folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        staged.chmod(0o755)  # mkdtemp's 0700 would make the installed folder private
        onnx.save_model(model, staged / "model.onnx")
        shutil.copyfile(src / "tokenizer.json", staged / "tokenizer.json")
        shutil.copyfile(src / "config.json", staged / "config.json")
        spec = {
            "format": ENCODER_FORMAT,
            "version": 1,
            "architecture": "bert",
            "pooling": pooling.mode,
            "normalize": pooling.normalize,
            "max_seq_length": pooling.max_seq_length,
            "hidden_size": cfg.hidden_size,
            "pad_token_id": cfg.pad_token_id,
            "inputs": ["input_ids", "attention_mask", "token_type_ids"],
            "output": "last_hidden_state",
            "weights": "embedded",
        }
        (staged / "pooling.json").write_text(json.dumps(spec, indent=2) + "\n")
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
            os.replace(dst, old / "x")
            os.replace(staged, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, dst)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dst
