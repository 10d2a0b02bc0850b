"""Convert a llama-architecture GGUF into an ONNX decoder folder for the onnxruntime backend.

:func:`convert_gguf` reads a GGUF (any tensor type ``gguf.quants`` can
dequantize: F32, F16, BF16, Q4_0/Q4_1/Q5_x/Q8_0, the K- and IQ-quants ...),
turns every weight into float32 and writes a folder that
:class:`engine.backends.onnxrt.OnnxBackend` loads:

* ``model.onnx`` + ``model.onnx.data`` — the decoder graph of
  :func:`engine.onnx.decoder.build_decoder_onnx` (native
  ``RMSNormalization`` / ``RotaryEmbedding`` / ``Attention`` at opset 23-24,
  plain ops at 17-22), weights as ONNX external data (SmolLM2-135M in f32 is
  ~650 MB, more than a protobuf should carry);
* ``tokenizer.json`` — a byte-level BPE built from the GGUF vocabulary
  (``tokenizer.ggml.model`` ``gpt2``: tokens, merges, token types → added
  tokens), with the pre-tokenizer that llama.cpp uses for
  ``tokenizer.ggml.pre``;
* ``config.json``, ``generation_config.json`` (end-of-generation ids as
  llama.cpp computes them: eos, EOT/EOM and the ``<|im_end|>``-style control
  tokens) and ``tokenizer_config.json`` (chat template, special tokens,
  ``add_bos_token``).

Rope: llama.cpp's ``llama`` architecture rotates adjacent pairs, and its
Hugging Face converter permutes the q and k rows so that this equals
Hugging Face's rotate-half on the original weights. The graph builder ropes
rotate-half, so the permutation is undone when the weights are read
(:mod:`engine.onnx.ggufread`; per head, the kv head count for k) — the
exact inverse of what :mod:`engine.onnx.tinydecoder` applies when it writes
its GGUF twin.

Tied embeddings (no ``output.weight``) reuse ``token_embd.weight`` as the LM
head. The folder is written in a staging directory next to ``dst`` and
renamed into place, so ``dst`` is either complete or absent.

Errors are :class:`protocol.errors.ModelLoadError` (``path``, ``reason``,
``detail``): ``missing``/``not_gguf``/``truncated`` from the header check,
``unsupported_architecture``, ``unsupported_tensor_type``, ``unsupported_model``
(shapes or features the graph cannot express), ``unsupported_tokenizer``.

With ``quantize="q4"`` (command flag ``--q4``) every linear projection (q, k,
v, o, gate, up, down and the LM head, tied or not) becomes a 4-bit
``com.microsoft`` ``MatMulNBits`` node (symmetric blocks of 32 along K,
``accuracy_level=4``; see :func:`engine.onnx.quant.quantize_q4`); the
embedding table and the norms stay float32. The GGUF's weights are
dequantized to float32 first and then requantized, so a Q4_1 source loses a
little more precision than it had.

With ``fused=True`` (``--fused``) the graph is
:func:`engine.onnx.fused.build_fused_decoder`'s: onnxruntime's fused CPU ops
and a KV cache the backend shares between past and present; with ``--q4``
this is the fast graph ``ferrous pull --onnx`` writes.

Command: ``python -m engine.onnx.convert SRC.gguf DST_FOLDER [--opset N] [--q4] [--fused] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from engine.gguf_header import read_gguf_header
from engine.onnx.decoder import TinyDecoderSpec, build_decoder_onnx, hf_config
from engine.onnx.fused import build_fused_decoder
from engine.onnx.ggufread import F32, Meta, check_shapes, decoder_spec, float32_weights, read_gguf
from engine.onnx.quant import LINEAR_WEIGHTS, QUANTIZE_MODES
from protocol.errors import ModelLoadError

__all__ = ["EOG_TOKEN_TEXTS", "convert_gguf", "main"]

# Control tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp).
EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
    }
)

# llama.cpp token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}

# tokenizer.ggml.pre → the Hugging Face pre-tokenizer with llama.cpp's regexes.
# "gpt-2": the GPT-2 regex alone (= ByteLevel's own). The StarCoder family
# (SmolLM2 is "smollm") first splits every digit, then the GPT-2 regex.
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    **{
        name: {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
        }
        for name in ("smollm", "starcoder", "refact", "codeshell")
    },
}


def _tokenizer_json(meta: Meta) -> tuple[dict[str, Any], list[str], list[int]]:
    """tokenizer.json (as a dict), the tokens in id order and their llama.cpp types."""
    model = meta.scalar("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(
            meta.path,
            "unsupported_tokenizer",
            f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is converted",
        )
    pre = meta.scalar("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            meta.path,
            "unsupported_tokenizer",
            f"tokenizer.ggml.pre {pre!r} (known: {', '.join(sorted(_PRE_TOKENIZERS))})",
        )
    tokens = meta.strings("tokenizer.ggml.tokens")
    types = meta.ints("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise ModelLoadError(meta.path, "unsupported_tokenizer", "no usable token list")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # llama.cpp also maps a repeated text to its first id
    merges: list[list[str]] = []
    for m in meta.strings("tokenizer.ggml.merges"):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ModelLoadError(meta.path, "unsupported_tokenizer", f"merge {m!r} is not a pair")
        merges.append(pair)
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ty == _CONTROL,
        }
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
        if ty in (_CONTROL, _USER_DEFINED) and vocab[t] == i
    ]
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": {**_BYTE_LEVEL, "trim_offsets": False},
        "decoder": _BYTE_LEVEL,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return data, tokens, types


def _eog_ids(meta: Meta, tokens: list[str], types: list[int]) -> list[int]:
    """End-of-generation ids in llama.cpp's way: eos, eot, eom, then EOG control texts."""
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        tid = meta.scalar(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(tokens) and tid not in ids:
            ids.append(tid)
    for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
        if t in EOG_TOKEN_TEXTS and ty in (_CONTROL, _USER_DEFINED) and i not in ids:
            ids.append(i)
    return ids


def _hf_json(
    meta: Meta, spec: TinyDecoderSpec, tied: bool, tokens: list[str], types: list[int]
) -> dict[str, dict[str, Any]]:
    def token_id(key: str) -> int | None:
        tid = meta.scalar(f"tokenizer.ggml.{key}_token_id")
        return tid if isinstance(tid, int) and 0 <= tid < len(tokens) else None

    bos, eos, pad, unk = (token_id(k) for k in ("bos", "eos", "padding", "unknown"))
    eog = _eog_ids(meta, tokens, types)
    config = hf_config(spec, tied=tied, bos=bos, eos=eos, pad=pad)
    generation = {"bos_token_id": bos, "eos_token_id": eog, "pad_token_id": pad}
    name = {i: tokens[i] if i is not None else None for i in (bos, eos, pad, unk)}
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": bool(meta.scalar("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.scalar("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": ty == _CONTROL,
            }
            for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
            if ty in (_CONTROL, _USER_DEFINED)
        },
        "bos_token": name[bos],
        "eos_token": name[eos],
        "pad_token": name[pad],
        "unk_token": name[unk],
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.n_ctx,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = meta.scalar("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    return {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config,
    }


# ---------------------------------------------------------------------------
# Writing


_DATA_ALIGN = 4096  # external tensors start on page boundaries (onnxruntime can map them)
_EXTERNAL_MIN = 1024  # initializers with at least this many elements go to external data


def _graph_with_placeholders(
    weights: dict[str, F32],
    spec: TinyDecoderSpec,
    opset: int,
    quantize: str | None = None,
    fused: bool = False,
    tied: bool = False,
) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, npt.NDArray[Any]]]]:
    """The decoder graph with each weight's initializer paired with the array it must hold.

    The graph builders copy every weight into the protobuf three times
    (tobytes, make_graph, make_model: ~6 s for SmolLM2's 650 MB). They are
    given 1- or 2-element stand-ins instead, each holding its weight's index,
    shaped (1, 2) for matrices so the stand-in's stored shape tells whether
    the graph keeps that weight as is or transposed ([in, out] for MatMul).
    :func:`_write_external` then writes the real arrays as external data.

    Weights the builder transforms (quantized with ``quantize``, packed into
    one q/k/v projection with ``fused``) get their real arrays, and every
    large initializer they produce is placed as it is.
    """
    names = list(weights)
    real: set[str] = set()
    linear = {f"blk.{i}.{n}.weight" for i in range(spec.n_layer) for n in LINEAR_WEIGHTS}
    if quantize is not None or fused:
        real = linear | {"output.weight"} if quantize is not None else linear
    stand_ins = {
        name: weights[name]
        if name in real
        else np.full((1,) if weights[name].ndim == 1 else (1, 2), i + 1, dtype=np.float32)
        for i, name in enumerate(names)
    }
    if fused:
        model = build_fused_decoder(stand_ins, spec, quantize=quantize, tied=tied)
    else:
        model = build_decoder_onnx(stand_ins, spec, opset=opset, quantize=quantize)
    model.graph.name = "llama_decoder"
    placed: list[tuple[onnx.TensorProto, npt.NDArray[Any]]] = []
    seen: set[str] = set(real)
    if fused and tied and quantize is not None:
        seen.add("token_embd.weight")  # looked up in the 4-bit LM head weight instead
    for init in model.graph.initializer:
        is_float = init.data_type == onnx.TensorProto.FLOAT
        if is_float and list(init.dims) in ([1], [1, 2], [2, 1]):
            value = numpy_helper.to_array(init)
            idx = int(value.flat[0]) - 1
            if 0 <= idx < len(names) and np.all(value == idx + 1):
                name = names[idx]
                w = weights[name]
                seen.add(name)
                placed.append((init, w.T if list(init.dims) == [2, 1] else w))
                continue
        if real and int(np.prod(init.dims)) >= _EXTERNAL_MIN:
            placed.append((init, numpy_helper.to_array(init)))
    if seen != set(names):
        raise RuntimeError(f"the graph builder did not place {sorted(set(names) - seen)}")
    return model, placed


def _write_external(
    model: onnx.ModelProto,
    placed: list[tuple[onnx.TensorProto, npt.NDArray[Any]]],
    data_path: Path,
) -> None:
    """Write each placed array to ``data_path`` and point its initializer there."""
    offset = 0
    with data_path.open("wb") as f:
        for init, arr in placed:
            pad = -offset % _DATA_ALIGN
            f.write(b"\0" * pad)
            offset += pad
            # float32 weights as little-endian f4; packed 4-bit weights keep uint8.
            data = np.ascontiguousarray(arr, dtype="<f4" if arr.dtype != np.uint8 else np.uint8)
            data.tofile(f)
            init.ClearField("raw_data")
            init.ClearField("float_data")
            del init.dims[:]
            init.dims.extend(data.shape)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (
                ("location", data_path.name),
                ("offset", str(offset)),
                ("length", str(data.nbytes)),
            ):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            offset += data.nbytes


def _dump_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _occupied(dst: Path) -> bool:
    return any(dst.iterdir()) if dst.is_dir() else dst.exists()


def _install(staging: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to ``dst`` (replacing an old one if allowed)."""
    if not _occupied(dst):
        if dst.is_dir():
            dst.rmdir()  # empty
        os.replace(staging, dst)
        return
    if not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True)")
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
    try:
        os.replace(dst, old / dst.name)
        try:
            os.replace(staging, dst)
        except OSError:
            os.replace(old / dst.name, dst)  # put the old folder back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def convert_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    opset: int = 23,
    overwrite: bool = False,
    quantize: str | None = None,
    fused: bool = False,
    share_embedding: bool = False,
) -> Path:
    """Write the ONNX decoder folder for the llama GGUF ``src`` at ``dst`` and return ``dst``.

    ``quantize="q4"`` writes 4-bit ``MatMulNBits`` projections (see the
    module docstring); ``None`` writes float32 ``MatMul``. ``fused`` writes
    the graph of :func:`engine.onnx.fused.build_fused_decoder` (fused
    contrib ops, KV cache shared in place; ``opset`` is then ignored).
    ``share_embedding`` (fused 4-bit graphs of models with a tied LM head)
    looks embeddings up in the 4-bit LM head weight instead of storing the
    float32 table: SmolLM2 shrinks from 192 to 88 MB, but its answers lose
    accuracy (measured: "12 plus 7" answered 8 instead of 19), so it is off
    by default.

    ``dst`` must not exist or be empty unless ``overwrite``; it appears
    complete or not at all. Raises :class:`ModelLoadError` for files the
    converter cannot express (see the module docstring).
    """
    src, dst = Path(src), Path(dst)
    if not 17 <= opset <= 24:
        raise ValueError(f"opset must be 17..24, not {opset}")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or 'q4', not {quantize!r}")
    if not overwrite and _occupied(dst):
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True)")
    header = read_gguf_header(src)  # fast, defensive: missing / not_gguf / truncated
    if header.architecture != "llama":
        raise ModelLoadError(
            str(src),
            "unsupported_architecture",
            f"{header.architecture!r}: only the 'llama' architecture is converted",
        )
    meta = Meta(read_gguf(src), src)
    tok_data, tokens, types = _tokenizer_json(meta)
    # The tokenizer is checked before the expensive part: tokenizers parses the JSON.
    from tokenizers import Tokenizer

    tok_text = json.dumps(tok_data, ensure_ascii=False)
    try:
        Tokenizer.from_str(tok_text)
    except Exception as exc:  # the tokenizers package raises plain Exceptions
        raise ModelLoadError(str(src), "unsupported_tokenizer", f"tokenizers: {exc}") from None

    weights, tied = float32_weights(meta.reader, meta)
    spec = decoder_spec(meta, weights["token_embd.weight"].shape[0])
    check_shapes(weights, spec, str(src))
    if len(tokens) > spec.vocab_size:
        raise ModelLoadError(
            str(src),
            "unsupported_model",
            f"{len(tokens)} tokens but an embedding table of {spec.vocab_size} rows",
        )
    model, placed = _graph_with_placeholders(
        weights, spec, opset, quantize, fused, tied and share_embedding
    )
    hf = _hf_json(meta, spec, tied, tokens, types)

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.staging-"))
    try:
        _write_external(model, placed, staging / "model.onnx.data")
        onnx.save_model(model, str(staging / "model.onnx"))
        del model, placed, weights
        (staging / "tokenizer.json").write_text(tok_text + "\n", encoding="utf-8")
        for name, data in hf.items():
            _dump_json(staging / name, data)
        _install(staging, dst, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.onnx.convert",
        description="Convert a llama-architecture GGUF into an ONNX decoder folder "
        "(float32, or 4-bit MatMulNBits projections with --q4).",
    )
    parser.add_argument("src", type=Path, help="the .gguf file")
    parser.add_argument("dst", type=Path, help="the model folder to write")
    parser.add_argument("--opset", type=int, default=23, help="23-24 native ops, 17-22 plain ops")
    parser.add_argument(
        "--q4",
        action="store_true",
        help="4-bit MatMulNBits (com.microsoft) projections and LM head, accuracy_level=4",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="fused contrib ops (SkipSimplifiedLayerNormalization, GroupQueryAttention) "
        "with a KV cache shared in place; with --q4 this is the fastest graph",
    )
    parser.add_argument(
        "--share-embedding",
        action="store_true",
        help="with --q4 --fused on a tied model: embeddings from the 4-bit LM head "
        "(smaller file, less accurate)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = convert_gguf(
            args.src,
            args.dst,
            opset=args.opset,
            overwrite=args.force,
            quantize="q4" if args.q4 else None,
            fused=args.fused,
            share_embedding=args.share_embedding,
        )
    except ModelLoadError as exc:  # the file is the one named: its reason and detail
        print(f"error: {exc.reason}: {exc.detail}", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for item in sorted(folder.iterdir()):
        print(f"{item} ({item.stat().st_size} bytes)")
    print(f"converted in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
