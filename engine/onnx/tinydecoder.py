"""A deterministic tiny Llama decoder written both as ONNX and as GGUF from the same weights.

The ONNX backend needs a real decoder to test against that loads in
milliseconds and needs no download, and a way to check it against the engine
we already trust. :func:`write_tiny_decoder` writes one model folder:

* ``model.onnx`` — the Llama decoder graph of
  :func:`engine.onnx.decoder.build_decoder_onnx` (native ops at opset 23-24,
  plain ops at 17-22; see that module), or with ``fused`` the graph of
  :func:`engine.onnx.fused.build_fused_decoder`;
* ``tokenizer.json`` — a byte-level BPE trained with ``tokenizers`` on a fixed
  English text in this module, with ``<|endoftext|>``, ``<|im_start|>`` and
  ``<|im_end|>`` as ids 0, 1, 2; plus ``tokenizer_config.json`` (ChatML
  template), ``config.json`` (Hugging Face ``llama``) and
  ``generation_config.json``;
* ``model.gguf`` — the same f32 weights for llama.cpp, with the tokenizer as a
  GGUF ``gpt2`` BPE (pre-tokenizer ``gpt-2``, the same regex as the
  ``tokenizers`` ByteLevel pre-tokenizer), so both tokenize identically.

llama.cpp's ``llama`` architecture ropes adjacent pairs where the ONNX graph
rotates halves: the GGUF gets q and k rows permuted exactly as llama.cpp's
Hugging Face converter does (with the kv head count for k).

Weights are seeded numpy normals; the LM head is scaled up
(:attr:`TinyDecoderSpec.logit_scale`) so greedy decoding has clear top-2
margins (random heads otherwise give near-ties that make two engines disagree
on rounding alone). Scaling cannot remove near-ties entirely (the argmax is a
continuous function's), so comparisons should still check the margin of each
step they rely on. The same seed and spec always give byte-identical files.

Run as a command: ``python -m engine.onnx.tinydecoder FOLDER [--seed N] [--opset N] [--q4] [--fused]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from engine.onnx.decoder import TinyDecoderSpec, build_decoder_onnx, hf_config
from engine.onnx.fused import build_fused_decoder
from engine.tinymodels import CHATML_TEMPLATE

__all__ = [
    "CORPUS",
    "SPECIAL_TOKENS",
    "decoder_weights",
    "main",
    "train_tiny_tokenizer",
    "write_tiny_decoder",
]

F32 = npt.NDArray[np.float32]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, PAD_ID = 0, 2, 0  # <|endoftext|> starts and pads; <|im_end|> ends a turn

# llama.cpp token types (gguf.TokenType): 1 normal, 3 control.
_NORMAL, _CONTROL = 1, 3

# The BPE training text: written for this module, plain English with numbers,
# contractions and punctuation so the merges cover what tests type.
CORPUS = """\
The small town sat at the bend of a slow river, and every morning the baker opened his shop \
before the sun was up. He made bread, rolls and a few sweet cakes, and the smell of them \
drifted down the street to the station. People said it was the best bread in the valley.
On Monday the weather was cold and grey. It rained in the morning, but by the afternoon the \
clouds had broken and the light came back over the hills. Children walked home from school \
along the water, throwing stones and counting how many times each one skipped: three, four, \
seven, twelve.
"Where are you going?" asked the old woman at the corner. "To the market," said the boy. \
"My mother needs eggs, milk, butter and two pounds of apples." She smiled and told him to \
come back before dark, because the road was long and the lamps were not yet lit.
The library opened at 9:30 and closed at 17:00. It held about 4,500 books, a room of maps, \
and a reading table by the window where the light was good. The librarian kept a list of \
every book that went out and every book that came back, and she was rarely wrong.
A computer is a machine that follows instructions. It reads a program, stores numbers in \
its memory, and changes them one step at a time. Some programs answer questions, some draw \
pictures, and some simply wait for the next message to arrive. When a model writes text, it \
picks one token after another, each time choosing the word that seems most likely to come \
next.
Don't forget: the meeting starts at ten o'clock, and we'll need the report, the notes and \
the new plan. If you can't come, please send a message; they're expecting everyone. What \
would you like to eat later? I think we should try the new place near the park.
In the summer the fields turned gold and the farmers worked from dawn until the evening. \
They cut the wheat, tied it in bundles and carried it to the barn. At night they sat outside, \
talking about the harvest, the price of grain and the long winter that would follow.
The teacher wrote a question on the board: what is the difference between a river and a \
stream? One student said a river is bigger. Another said a stream is faster. The teacher \
said that both answers were good ones, and that the best answer is often a careful one.
Hello, world! This is a test. This is only a test. Please read the first line, then the \
second line, and then write your answer below. Thank you for your time and your help.
"""


# ---------------------------------------------------------------------------
# Tokenizer


def train_tiny_tokenizer(vocab_size: int = TinyDecoderSpec.vocab_size) -> Tokenizer:
    """Train the byte-level BPE on :data:`CORPUS` (deterministic, ~10 ms)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError("vocab_size must hold the 256 byte tokens and the special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise ValueError(f"the corpus yields a vocabulary of {got} tokens, not {vocab_size}")
    return tok


def _vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    """Tokens in id order and merges as ``"a b"`` strings, from the tokenizer's JSON."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    tokens = [""] * tok.get_vocab_size()
    for piece, idx in vocab.items():
        tokens[idx] = piece
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
    if "" in tokens:
        raise ValueError("the tokenizer's ids are not contiguous")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


# ---------------------------------------------------------------------------
# Weights


def decoder_weights(spec: TinyDecoderSpec, seed: int = 0) -> dict[str, F32]:
    """Seeded weights in Hugging Face layout ([out, in]) under GGUF tensor names.

    q and k are *not* permuted here (rotate-half order); :func:`_gguf_tensors`
    permutes them for llama.cpp. Norm weights are ``1 + 0.1·N(0, 1)`` rather
    than ones so a missing or misplaced norm scale shows up in comparisons.
    """
    rng = np.random.default_rng(seed)
    e, f, d = spec.n_embd, spec.n_ff, spec.head_dim
    q_dim, kv_dim = spec.n_head * d, spec.n_kv_head * d

    def normal(*shape: int, scale: float) -> F32:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm() -> F32:
        return (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)

    w: dict[str, F32] = {"token_embd.weight": normal(spec.vocab_size, e, scale=1.0)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm()
        w[p + "attn_q.weight"] = normal(q_dim, e, scale=1.0 / math.sqrt(e))
        w[p + "attn_k.weight"] = normal(kv_dim, e, scale=1.0 / math.sqrt(e))
        w[p + "attn_v.weight"] = normal(kv_dim, e, scale=1.0 / math.sqrt(e))
        w[p + "attn_output.weight"] = normal(e, q_dim, scale=1.0 / math.sqrt(q_dim))
        w[p + "ffn_norm.weight"] = norm()
        w[p + "ffn_gate.weight"] = normal(f, e, scale=1.0 / math.sqrt(e))
        w[p + "ffn_up.weight"] = normal(f, e, scale=1.0 / math.sqrt(e))
        w[p + "ffn_down.weight"] = normal(e, f, scale=1.0 / math.sqrt(f))
    w["output_norm.weight"] = norm()
    w["output.weight"] = normal(spec.vocab_size, e, scale=spec.logit_scale / math.sqrt(e))
    return w


def _permute_for_llama_cpp(w: F32, n_head: int) -> F32:
    """Reorder each head's rows from rotate-half pairs (i, i+d/2) to adjacent pairs (2i, 2i+1)."""
    rows, cols = w.shape
    out = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    return np.ascontiguousarray(out)


def _gguf_tensors(weights: dict[str, F32], spec: TinyDecoderSpec) -> dict[str, F32]:
    out = dict(weights)
    for i in range(spec.n_layer):
        q, k = f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"
        out[q] = _permute_for_llama_cpp(weights[q], spec.n_head)
        out[k] = _permute_for_llama_cpp(weights[k], spec.n_kv_head)
    return out


# ---------------------------------------------------------------------------
# Files


def _dump_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _hf_files(folder: Path, spec: TinyDecoderSpec, tokens: list[str]) -> None:
    config = hf_config(spec, tied=False, bos=BOS_ID, eos=EOS_ID, pad=PAD_ID)
    _dump_json(folder / "config.json", config)
    _dump_json(
        folder / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "pad_token_id": PAD_ID},
    )
    added = {
        str(i): {
            "content": tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i in range(len(SPECIAL_TOKENS))
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": tokens[BOS_ID],
        "eos_token": tokens[EOS_ID],
        "pad_token": tokens[PAD_ID],
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.n_ctx,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _dump_json(folder / "tokenizer_config.json", tokenizer_config)


def _write_gguf(
    path: Path,
    weights: dict[str, F32],
    spec: TinyDecoderSpec,
    tokens: list[str],
    merges: list[str],
    name: str,
) -> None:
    import gguf  # heavy import, only needed here

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_kv_head)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    n_special = len(SPECIAL_TOKENS)
    writer.add_token_types([_CONTROL] * n_special + [_NORMAL] * (len(tokens) - n_special))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for tname, arr in _gguf_tensors(weights, spec).items():
        writer.add_tensor(tname, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_decoder(
    folder: str | os.PathLike[str],
    *,
    seed: int = 0,
    spec: TinyDecoderSpec | None = None,
    opset: int = 23,
    quantize: str | None = None,
    fused: bool = False,
) -> Path:
    """Write the model folder (see the module docstring) and return it.

    The same ``seed``, ``spec``, ``opset`` and ``quantize`` always write the
    same bytes; the tokenizer depends on ``spec.vocab_size`` only.
    ``quantize="q4"`` writes ``model.onnx`` with 4-bit ``MatMulNBits``
    projections (see :func:`build_decoder_onnx`); ``model.gguf`` stays f32.
    ``fused`` writes the graph of :func:`engine.onnx.fused.build_fused_decoder`
    instead (``opset`` ignored). Files are written under temporary names and
    renamed, so a reader never sees half a file.
    """
    spec = spec or TinyDecoderSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(spec.vocab_size)
    weights = decoder_weights(spec, seed)
    if fused:
        model = build_fused_decoder(weights, spec, quantize=quantize)
    else:
        model = build_decoder_onnx(weights, spec, opset=opset, quantize=quantize)

    with tempfile.TemporaryDirectory(dir=folder, prefix=".staging-") as tmp:
        _write_files(Path(tmp), folder, spec, seed, tok, weights, model)
    return folder


def _write_files(
    staging: Path,
    folder: Path,
    spec: TinyDecoderSpec,
    seed: int,
    tok: Tokenizer,
    weights: dict[str, F32],
    model: onnx.ModelProto,
) -> None:
    tokens, merges = _vocab_and_merges(tok)
    (staging / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _hf_files(staging, spec, tokens)
    (staging / "model.onnx").write_bytes(model.SerializeToString())
    _write_gguf(staging / "model.gguf", weights, spec, tokens, merges, f"tiny-decoder-s{seed}")
    for item in sorted(staging.iterdir()):
        os.replace(item, folder / item.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.onnx.tinydecoder",
        description="Write a tiny Llama decoder as ONNX and GGUF (same weights) with its tokenizer.",
    )
    parser.add_argument("folder", type=Path, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opset", type=int, default=23, help="23-24 native ops, 17-22 plain ops")
    parser.add_argument(
        "--q4", action="store_true", help="4-bit MatMulNBits projections in model.onnx"
    )
    parser.add_argument(
        "--fused", action="store_true", help="fused contrib ops and a KV cache shared in place"
    )
    args = parser.parse_args(argv)
    folder = write_tiny_decoder(
        args.folder,
        seed=args.seed,
        opset=args.opset,
        quantize="q4" if args.q4 else None,
        fused=args.fused,
    )
    for item in sorted(folder.iterdir()):
        print(f"{item} ({item.stat().st_size} bytes)")
    spec = asdict(TinyDecoderSpec())
    print(json.dumps(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
