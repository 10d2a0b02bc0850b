"""Deterministic writers of tiny Llama-architecture GGUF models.

Tests and demos need real model files that load in milliseconds and need no
download. :func:`write_tiny_llama` writes one with seeded weights and a
SentencePiece-style vocabulary with byte fallback (``<0x00>``..``<0xFF>``), so
any UTF-8 text round-trips through its tokenizer.

Two kinds of weights:

* ``script=None`` — random weights: the model babbles, deterministically for a
  given seed and sampling seed.
* ``script="Hi ö你🙂!"`` — the model is wired so that the next token is a fixed
  function of the current one: after any prompt it emits the script's tokens
  and then starts the script again (or emits ``</s>`` when ``script_eos``).
  Non-ASCII characters become byte tokens, so a character spans several
  tokens; tests use this to check UTF-8 reassembly, stop sequences split across
  tokens, backpressure on endless output, and cancellation. Every token of a
  script must be distinct (the next token depends on the current one only).

Run as a command: ``ferrous-tiny-model OUT.gguf [--seed N] [--dtype f32|f16|q8_0]
[--script TEXT] [--chat-template]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

__all__ = [
    "CHATML_TEMPLATE",
    "TinyLlamaSpec",
    "main",
    "script_tokens",
    "tiny_vocab",
    "write_tiny_llama",
]

import gguf

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_SPACE = "\u2581"  # SentencePiece's word-boundary marker

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = ("the", "and", "is", "of", "to", "in", "it", "you", "that", "was", "for", "on")


class TinyLlamaSpec:
    """Shape of a tiny model; the defaults make a ~1 MB file."""

    def __init__(
        self,
        *,
        n_embd: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_ff: int = 128,
        n_ctx: int = 512,
    ) -> None:
        if n_embd % n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_ff = n_ff
        self.n_ctx = n_ctx


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token types) of the tiny vocabulary.

    Layout: ``<unk> <s> </s>``, 256 byte tokens, chat control tokens, then
    pieces: ``▁``, printable ASCII characters, ``▁`` + letter, a few words.
    Longer pieces score higher so the SentencePiece merge prefers them.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [_CONTROL, _CONTROL]
    pieces = [_SPACE]
    pieces += [chr(c) for c in range(33, 127)]
    pieces += [_SPACE + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [_SPACE + chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [_SPACE + w for w in _WORDS]
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-1000.0 / len(p) for p in pieces]
    return tokens, scores, types


def script_tokens(script: str, tokens: list[str]) -> list[int]:
    """Token ids that spell ``script``: ASCII through pieces (a space and the letter after
    it as one, ``▁x``), the rest through bytes."""
    index = {t: i for i, t in enumerate(tokens)}
    ids: list[int] = []
    i = 0
    while i < len(script):
        ch = script[i]
        pair = _SPACE + script[i + 1 : i + 2]
        if ch == " " and len(pair) == 2 and pair[1].isascii() and pair in index:
            ids.append(index[pair])
            i += 2
            continue
        i += 1
        piece = _SPACE if ch == " " else ch
        if piece in index and ch.isascii():
            ids.append(index[piece])
        else:
            ids.extend(index[f"<0x{b:02X}>"] for b in ch.encode("utf-8"))
    if len(set(ids)) != len(ids):
        raise ValueError(f"script {script!r} repeats a token; every token must be distinct")
    return ids


def _weights(
    spec: TinyLlamaSpec,
    n_vocab: int,
    rng: np.random.Generator,
    script_ids: list[int] | None,
    eos: int | None,
) -> dict[str, np.ndarray]:
    e, f = spec.n_embd, spec.n_ff
    w: dict[str, np.ndarray] = {}

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    if script_ids is None:
        w["token_embd.weight"] = rand(n_vocab, e, scale=1.0)
        w["output.weight"] = rand(n_vocab, e, scale=1.0 / np.sqrt(e))
    else:
        # Orthogonal directions for script tokens, one shared direction for all
        # other tokens; the output matrix maps direction i to script token i+1.
        n = len(script_ids)
        if n + 1 > e:
            raise ValueError(f"script has {n} tokens; at most {e - 1} fit in n_embd={e}")
        embd = rand(n_vocab, e, scale=0.01)
        embd[:, : n + 1] = 0.0
        embd[:, n] = 1.0
        out = rand(n_vocab, e, scale=0.01)
        out[:, : n + 1] = 0.0
        for i, tok in enumerate(script_ids):
            embd[tok] = 0.0
            embd[tok, i] = 1.0
            nxt = script_ids[(i + 1) % n] if (eos is None or i + 1 < n) else eos
            out[nxt, i] = 4.0
        out[script_ids[0], n] = 4.0  # any other token leads into the script
        w["token_embd.weight"] = embd
        w["output.weight"] = out
    w["output_norm.weight"] = np.ones(e, dtype=np.float32)
    zero_out = script_ids is not None  # blocks add nothing to the residual stream
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = np.ones(e, dtype=np.float32)
        w[p + "ffn_norm.weight"] = np.ones(e, dtype=np.float32)
        for name in ("attn_q", "attn_k", "attn_v"):
            w[p + name + ".weight"] = rand(e, e, scale=1.0 / np.sqrt(e))
        w[p + "attn_output.weight"] = (
            np.zeros((e, e), np.float32) if zero_out else rand(e, e, scale=1.0 / np.sqrt(e))
        )
        w[p + "ffn_gate.weight"] = rand(f, e, scale=1.0 / np.sqrt(e))
        w[p + "ffn_up.weight"] = rand(f, e, scale=1.0 / np.sqrt(e))
        w[p + "ffn_down.weight"] = (
            np.zeros((e, f), np.float32) if zero_out else rand(e, f, scale=1.0 / np.sqrt(f))
        )
    return w


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: str = "f32",
    chat_template: str | None = CHATML_TEMPLATE,
    script: str | None = None,
    script_eos: bool = False,
    spec: TinyLlamaSpec | None = None,
    name: str = "tiny-llama",
    deltas: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a tiny Llama GGUF to ``path`` and return the path.

    The same arguments always produce the same bytes. ``dtype`` is ``f32``,
    ``f16`` or ``q8_0`` for the 2-D weight matrices (norms stay f32).
    ``deltas`` are added to the named weights first (an adapter merged in:
    :mod:`engine.tinylora`).
    """
    spec = spec or TinyLlamaSpec()
    if dtype not in ("f32", "f16", "q8_0"):
        raise ValueError(f"dtype must be f32, f16 or q8_0, not {dtype!r}")
    tokens, scores, types = tiny_vocab()
    script_ids = script_tokens(script, tokens) if script is not None else None
    rng = np.random.default_rng(seed)
    weights = _weights(spec, len(tokens), rng, script_ids, 2 if script_eos else None)
    for tname, delta in (deltas or {}).items():
        weights[tname] = (weights[tname] + delta).astype(np.float32)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_name(name)
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for tname, arr in weights.items():
        if arr.ndim == 1 or dtype == "f32":
            writer.add_tensor(tname, arr)
        elif dtype == "f16":
            writer.add_tensor(tname, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrous-tiny-model", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="path of the GGUF file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f32")
    parser.add_argument("--script", default=None, help="text the model repeats after any prompt")
    parser.add_argument("--script-eos", action="store_true", help="end the script with </s>")
    parser.add_argument("--no-chat-template", action="store_true")
    args = parser.parse_args(argv)
    path = write_tiny_llama(
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        script=args.script,
        script_eos=args.script_eos,
        chat_template=None if args.no_chat_template else CHATML_TEMPLATE,
    )
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
