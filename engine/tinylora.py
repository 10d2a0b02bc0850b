"""A deterministic writer of tiny LoRA adapters for the tiny models (:mod:`engine.tinymodels`).

A LoRA adapter changes a weight ``W`` (``out x in``) to ``W + s * (alpha / r) * B @ A``
with ``A`` (``r x in``) and ``B`` (``out x r``) of a small rank ``r`` and a scale
``s`` chosen when it is applied. llama.cpp reads adapters as GGUF files of their
own (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
the base's ``general.architecture``), with a pair of tensors per adapted weight
named after it: ``<weight>.lora_a`` and ``<weight>.lora_b``, stored as GGUF
stores any matrix (numpy's ``A`` and ``B`` as they are).

:func:`write_tiny_lora` writes one and returns the exact deltas, so a test can
write the merged model (:func:`engine.tinymodels.write_tiny_llama` with
``deltas``) and compare what the two produce.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from engine.tinymodels import TinyLlamaSpec

__all__ = ["LORA_TARGETS", "write_tiny_lora"]

# The projections adapted by default: attention and the feed-forward block.
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")


def write_tiny_lora(
    path: str | os.PathLike[str],
    *,
    spec: TinyLlamaSpec | None = None,
    seed: int = 1,
    rank: int = 4,
    alpha: float = 8.0,
    strength: float = 1.0,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write an adapter for a tiny model of ``spec`` to ``path``: the path, and each
    adapted weight's delta at scale 1 (``alpha / rank * B @ A``, numpy's layout).

    ``strength`` sizes the deltas relative to the base weights (1: as large as
    them, so the adapted model's greedy answer differs from the base's).
    """
    spec = spec or TinyLlamaSpec()
    if rank < 1:
        raise ValueError("rank must be at least 1")
    e, f = spec.n_embd, spec.n_ff
    shapes = {
        "attn_q": (e, e),
        "attn_k": (e, e),
        "attn_v": (e, e),
        "attn_output": (e, e),
        "ffn_gate": (f, e),
        "ffn_up": (f, e),
        "ffn_down": (e, f),
    }
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name("tiny-lora")
    deltas: dict[str, np.ndarray] = {}
    for layer in range(spec.n_layer):
        for target in targets:
            n_out, n_in = shapes[target]
            name = f"blk.{layer}.{target}.weight"
            # Scaled so B @ A is about as large as the base weight (1/sqrt(in)).
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * strength / np.sqrt(rank)).astype(np.float32)
            writer.add_tensor(name + ".lora_a", a)
            writer.add_tensor(name + ".lora_b", b)
            deltas[name] = (np.float32(alpha / rank) * (b @ a)).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out, deltas
