"""A deterministic tiny BERT in the sentence-transformers layout, for tests.

The ONNX encoder path (:mod:`engine.onnx.bert_convert`,
:mod:`engine.onnx.encoder`) needs a source folder to convert that needs no
download and converts in milliseconds. :func:`write_tiny_bert` writes one
with seeded random weights and the same files and tensor names as
all-MiniLM-L6-v2, next to :mod:`engine.tinymodels` (tiny GGUF llamas) and
:mod:`engine.onnx.tinydecoder` (a tiny ONNX + GGUF decoder).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from engine.onnx.bert import BertConfig, tensor_shapes

__all__ = ["TinyBertSpec", "write_tiny_bert"]

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
    """Shape of the tiny BERT (the vocabulary is fixed: :func:`_tiny_vocab`)."""

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
    for name, shape in tensor_shapes(cfg).items():
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
