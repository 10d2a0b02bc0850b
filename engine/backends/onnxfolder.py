"""Reading an ONNX decoder folder: the graph's inputs and outputs, its configs, its tokenizer.

What :class:`engine.backends.onnxrt.OnnxBackend` needs to know before its
first step, found by the names Optimum and onnxruntime-genai use and read
from the graph rather than assumed (see that module's docstring); every
missing or inconsistent piece is a :class:`ModelLoadError` naming it. Also
how the folder's tokenizer spells a token as bytes (byte-level BPE or
SentencePiece).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from engine.backends.base import LoadParams
from engine.backends.onnx_entry import OnnxOptions, check_onnx_folder
from engine.backends.onnxsession import (
    graph_opsets,
    has_op,
    providers_for,
    read_json,
    session_options,
)
from protocol.errors import ModelLoadError

__all__ = [
    "MAX_DEFAULT_CTX",
    "DecoderFolder",
    "is_byte_level",
    "open_decoder_folder",
    "token_piece",
]

MAX_DEFAULT_CTX = 4096


@dataclass(frozen=True, slots=True)
class DecoderFolder:
    """A decoder folder opened: its session, tokenizer and the shapes read from it."""

    session: ort.InferenceSession
    tokenizer: Tokenizer
    tokenizer_json: str
    n_ctx: int
    n_layer: int
    kv_heads: int
    head_dim: int
    eos_ids: set[int]
    bos_id: int | None
    """Only when the tokenizer config asks for a BOS to be added."""
    chat_template: str | None
    has_positions: bool
    shared_kv: bool
    """The graph appends to one KV buffer in place (GroupQueryAttention)."""


def _session(folder: Path, params: LoadParams, opts: OnnxOptions) -> ort.InferenceSession:
    options = session_options(params.n_threads, opts)  # a bad option: ValueError, as is
    try:
        return ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=providers_for(opts, str(folder))
        )
    except Exception as exc:  # onnxruntime raises its own Exception subclasses
        if "opset" in str(exc).lower():
            raise ModelLoadError(
                str(folder),
                "unsupported_opset",
                f"the graph uses {graph_opsets(folder / 'model.onnx')}, which onnxruntime "
                f"{ort.__version__} does not support",
            ) from None
        raise ModelLoadError(str(folder), "backend", f"onnxruntime: {exc}") from None


def _n_layer(folder: Path, inputs: set[str], outputs: set[str]) -> int:
    for required in ("input_ids", "attention_mask"):
        if required not in inputs:
            raise ModelLoadError(str(folder), "graph", f"the graph has no input {required!r}")
    if "logits" not in outputs:
        raise ModelLoadError(str(folder), "graph", "the graph has no output 'logits'")
    n_layer = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    for i in range(n_layer):
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in inputs:
                raise ModelLoadError(
                    str(folder), "graph", f"the graph has no input past_key_values.{i}.{kind}"
                )
            if f"present.{i}.{kind}" not in outputs:
                raise ModelLoadError(
                    str(folder), "graph", f"the graph has no output present.{i}.{kind}"
                )
    if n_layer == 0:
        raise ModelLoadError(
            str(folder), "graph", "the graph has no past_key_values inputs (no KV cache)"
        )
    return n_layer


def open_decoder_folder(path: str, params: LoadParams, opts: OnnxOptions) -> DecoderFolder:
    """Open the decoder folder at ``path`` with ``opts``' execution providers and threads."""
    folder = check_onnx_folder(path)
    config = read_json(folder / "config.json")
    gen_config = read_json(folder / "generation_config.json")
    tok_config = read_json(folder / "tokenizer_config.json")
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the tokenizers package raises plain Exceptions
        raise ModelLoadError(str(folder), "tokenizer", f"tokenizer.json: {exc}") from None
    session = _session(folder, params, opts)
    inputs = {i.name: i for i in session.get_inputs()}
    n_layer = _n_layer(folder, set(inputs), {o.name for o in session.get_outputs()})
    # KV shape [batch, kv_heads, seq, head_dim]: declared by the graph, else config.json.
    shape = inputs["past_key_values.0.key"].shape
    n_head = int(config.get("num_attention_heads", 0) or 0)
    kv_heads = (
        shape[1]
        if isinstance(shape[1], int)
        else int(config.get("num_key_value_heads", n_head) or 0)
    )
    hidden = int(config.get("hidden_size", 0) or 0)
    head_dim = (
        shape[3]
        if isinstance(shape[3], int)
        else int(config.get("head_dim", hidden // n_head if n_head else 0) or 0)
    )
    if kv_heads <= 0 or head_dim <= 0:
        raise ModelLoadError(
            str(folder), "config", "cannot tell the KV cache shape from the graph or config.json"
        )
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    cfg_vocab = int(config.get("vocab_size", vocab_size) or vocab_size)
    if cfg_vocab < vocab_size:
        raise ModelLoadError(
            str(folder),
            "tokenizer",
            f"tokenizer.json has {vocab_size} tokens but the model only {cfg_vocab}",
        )
    eos = gen_config.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
    if not eos_ids and isinstance(tok_config.get("eos_token"), str):
        tid = tokenizer.token_to_id(tok_config["eos_token"])
        if tid is not None:
            eos_ids = {tid}
    bos = config.get("bos_token_id")
    add_bos = bool(tok_config.get("add_bos_token", False))
    template = params.chat_template or tok_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    max_pos = int(config.get("max_position_embeddings", 2048) or 2048)
    return DecoderFolder(
        session=session,
        tokenizer=tokenizer,
        tokenizer_json=(folder / "tokenizer.json").read_text(encoding="utf-8"),
        n_ctx=params.n_ctx or min(max_pos, MAX_DEFAULT_CTX),
        n_layer=n_layer,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eos_ids=eos_ids,
        bos_id=bos if isinstance(bos, int) and add_bos else None,
        chat_template=template if isinstance(template, str) else None,
        has_positions="position_ids" in inputs,
        shared_kv=has_op(folder / "model.onnx", "GroupQueryAttention"),
    )


# -- how a token is spelled ---------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, codes, strict=True)}


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder is byte-level BPE (GPT-2's byte map), not SentencePiece."""
    try:
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    except ValueError:
        return False
    return bool(decoder.get("type", "") == "ByteLevel")


def token_piece(text: str, byte_level: bool) -> bytes:
    """The bytes a (non-special) vocabulary entry ``text`` stands for."""
    if byte_level:
        return bytes(_BYTE_OF_CHAR.get(c, 0x3F) for c in text)
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        return bytes([int(text[3:5], 16)])  # SentencePiece byte fallback
    return text.replace("▁", " ").encode("utf-8")
