"""BERT encoders as sentence-transformers ship them, and the folders they convert to.

The project serves embeddings from BERT encoders converted to ONNX without
torch (:mod:`engine.onnx.bert_convert`), runs them with onnxruntime
(:mod:`engine.onnx.encoder`) and checks them against a numpy forward pass
(:mod:`engine.onnx.bert_reference`). All three read the same things, so they
are read here, once:

- a sentence-transformers folder: ``config.json`` (:func:`read_config`, BERT
  with absolute positions and GELU only), ``model.safetensors``
  (:func:`read_weights`, every tensor checked against the config's shapes),
  the pooling modules (:func:`read_pooling`: ``modules.json``,
  ``1_Pooling/config.json``, ``sentence_bert_config.json``) and the WordPiece
  ``tokenizer.json`` (:func:`load_tokenizer`);
- :class:`Pooling`, how hidden states become one sentence vector, which the
  converted folder records in ``pooling.json`` (format :data:`ENCODER_FORMAT`).

Errors in a folder raise :class:`~protocol.errors.ModelLoadError` with reason
``missing``, ``unsupported_architecture`` or ``corrupt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from protocol.errors import ModelLoadError

__all__ = [
    "ENCODER_FORMAT",
    "POOLING_MODES",
    "BertConfig",
    "Pooling",
    "load_tokenizer",
    "read_config",
    "read_json",
    "read_pooling",
    "read_weights",
    "tensor_shapes",
]

# The "format" of a converted folder's pooling.json: what the runtime accepts.
ENCODER_FORMAT: Final = "ferrousforge.onnx-encoder"
POOLING_MODES: Final = ("mean", "cls", "max", "mean_sqrt_len")

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The shape of a BERT encoder, from its ``config.json``."""

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


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ModelLoadError ``missing`` or ``corrupt``."""
    if not path.is_file():
        raise ModelLoadError(str(path), "missing", "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(str(path), "corrupt", f"not valid JSON: {exc}") from exc


def read_config(folder: Path) -> BertConfig:
    """The BERT shape in ``folder/config.json``; other architectures are refused."""
    path = folder / "config.json"
    raw = read_json(path)
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


def tensor_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
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


def read_weights(folder: Path, cfg: BertConfig) -> dict[str, F32]:
    """Every tensor :func:`tensor_shapes` names, as float32, checked against ``cfg``."""
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
    for name, shape in tensor_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(str(path), "corrupt", f"tensor {name} is missing")
        if tuple(t.shape) != shape:
            raise ModelLoadError(
                str(path), "corrupt", f"tensor {name} has shape {tuple(t.shape)}, expected {shape}"
            )
        out[name] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def read_pooling(folder: Path, cfg: BertConfig) -> Pooling:
    """Pooling from modules.json + the Pooling module's config (mean, no normalise by default)."""
    modules_path = folder / "modules.json"
    pool_dir = folder / "1_Pooling"
    normalize = False
    if modules_path.is_file():
        modules = read_json(modules_path)
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
        pool_cfg = read_json(pool_cfg_path)
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
        st_len = read_json(st_cfg_path).get("max_seq_length")
        if isinstance(st_len, int) and st_len > 0:
            max_len = min(max_len, st_len)  # what sentence-transformers itself truncates to
    return Pooling(mode=mode, normalize=normalize, max_seq_length=max_len)


def load_tokenizer(path: Path, max_length: int | None) -> Tokenizer:
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
