"""A deterministic writer of tiny vision language models: a tiny text model and its projector.

llama.cpp reads a vision language model as two GGUF files: the text model, and a
projector (``general.architecture`` ``clip``) holding a small vision
transformer and the projection of its patch features into the text model's
embedding space. In the simplest layout (``clip.projector_type`` ``mlp``, as
LLaVA's), an image is resized to ``image_size`` square, cut into
``patch_size`` patches, each patch embedded by a convolution plus a learned
position, passed through the transformer blocks, and projected by a two-layer
MLP (``mm.0``, GELU, ``mm.2``): one text-model embedding per patch, so an image
takes ``(image_size / patch_size) ** 2`` positions of the context.

:func:`write_tiny_projector` writes such a projector with seeded weights for a
text model ``text_n_embd`` wide; :func:`write_tiny_vlm` writes a folder with a
tiny text model (:mod:`engine.tinymodels`) and its projector, the layout the
llama.cpp backend serves (:func:`engine.backends.gguf_entry.vision_pair`).
Images of different colours give different answers, the same image the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from engine.tinymodels import TinyLlamaSpec, write_tiny_llama

__all__ = ["write_tiny_projector", "write_tiny_vlm"]


def write_tiny_projector(
    path: str | os.PathLike[str],
    *,
    text_n_embd: int = 64,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    n_embd: int = 32,
    n_ff: int = 64,
    n_layer: int = 1,
    n_head: int = 2,
) -> Path:
    """Write a tiny ``mlp`` projector to ``path`` (the same arguments, the same bytes)."""
    if image_size % patch_size or n_embd % n_head:
        raise ValueError("image_size must be a multiple of patch_size, n_embd of n_head")
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float | None = None) -> np.ndarray:
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, np.float32)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="clip")
    w.add_name("tiny-projector")
    w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, "mlp")
    v = gguf.Keys.ClipVision
    w.add_uint32(v.IMAGE_SIZE, image_size)
    w.add_uint32(v.PATCH_SIZE, patch_size)
    w.add_uint32(v.EMBEDDING_LENGTH, n_embd)
    w.add_uint32(v.FEED_FORWARD_LENGTH, n_ff)
    w.add_uint32(v.PROJECTION_DIM, text_n_embd)
    w.add_uint32(v.BLOCK_COUNT, n_layer)
    w.add_uint32(v.Attention.HEAD_COUNT, n_head)
    w.add_float32(v.Attention.LAYERNORM_EPS, 1e-5)
    w.add_array(v.IMAGE_MEAN, [0.5, 0.5, 0.5])
    w.add_array(v.IMAGE_STD, [0.5, 0.5, 0.5])
    w.add_bool(v.USE_GELU, True)
    n_patches = (image_size // patch_size) ** 2
    # numpy shapes as GGUF stores them: a convolution (out, in, kh, kw), matrices (out, in).
    w.add_tensor("v.patch_embd.weight", weight(n_embd, 3, patch_size, patch_size, scale=0.1))
    w.add_tensor("v.position_embd.weight", weight(n_patches, n_embd, scale=0.1))
    w.add_tensor("v.pre_ln.weight", ones(n_embd))
    w.add_tensor("v.pre_ln.bias", zeros(n_embd))
    for b in range(n_layer):
        p = f"v.blk.{b}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(p + name + ".weight", weight(n_embd, n_embd))
            w.add_tensor(p + name + ".bias", zeros(n_embd))
        for name in ("ln1", "ln2"):
            w.add_tensor(p + name + ".weight", ones(n_embd))
            w.add_tensor(p + name + ".bias", zeros(n_embd))
        w.add_tensor(p + "ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.bias", zeros(n_ff))
        w.add_tensor(p + "ffn_down.weight", weight(n_embd, n_ff))
        w.add_tensor(p + "ffn_down.bias", zeros(n_embd))
    w.add_tensor("mm.0.weight", weight(text_n_embd, n_embd))
    w.add_tensor("mm.0.bias", zeros(text_n_embd))
    # Large enough that an image moves the text model's answer.
    w.add_tensor("mm.2.weight", weight(text_n_embd, text_n_embd, scale=1.0))
    w.add_tensor("mm.2.bias", zeros(text_n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def write_tiny_vlm(folder: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """A folder with a tiny text model (``model.gguf``) and its projector
    (``projector.gguf``): a vision language model the llama.cpp backend serves."""
    root = Path(folder)
    spec = TinyLlamaSpec()
    write_tiny_llama(root / "model.gguf", seed=seed, spec=spec)
    write_tiny_projector(root / "projector.gguf", text_n_embd=spec.n_embd, seed=seed)
    return root


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m engine.tinyprojector FOLDER")
    print(write_tiny_vlm(sys.argv[1]))
