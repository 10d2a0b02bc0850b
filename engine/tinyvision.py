"""Deterministic tiny image models in the layouts real exports ship, for tests and demos.

:func:`write_tiny_clip` writes a CLIP-style image and text embedder in the
layout ONNX exports of CLIP ship in (``onnx/text_model.onnx`` and
``onnx/vision_model.onnx``, ``tokenizer.json``, ``preprocessor_config.json``,
``config.json``): the text model pools its token embeddings and projects
them, the vision model cuts the image into patches, embeds and pools them and
projects the result into the same space. Its weights are seeded random, except
that the colour words' embeddings line up with what the vision side makes of
an image of that colour, so "a red square" ranks a red image first; a numpy
forward pass from :class:`TinyClip`'s weights gives the same vectors.

:func:`write_tiny_classifier` writes an image classifier folder
(``model.onnx``, ``preprocessor_config.json``, ``config.json`` with
``id2label``) whose answer is known without running it: the graph averages
each colour channel over the image and scores label ``k`` by channel ``k``,
so a red image is ``red``, a green one ``green``. Both input layouts real
graphs use are written (``nchw`` as exported from PyTorch, ``nhwc`` as from
Caffe or TensorFlow), with or without the softmax inside the graph, so the
backend's layout and score handling are proven on both sides.

Command: ``python -m engine.tinyvision DIR [classifier|clip]`` writes one to ``DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["TINY_CLIP_WORDS", "TINY_LABELS", "TinyClip", "write_tiny_classifier", "write_tiny_clip"]

TINY_LABELS = ("red", "green", "blue")
_OPSET = 17


def write_tiny_classifier(
    folder: Path,
    *,
    size: int = 32,
    layout: Literal["nchw", "nhwc"] = "nchw",
    softmax: bool = False,
    gain: float = 4.0,
) -> Path:
    """A three-label colour classifier at ``folder`` (created); returns ``folder``.

    Its logits are ``gain x`` the mean of each normalised channel (values in
    -1..1), plus a fixed bias that breaks ties towards ``red``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    n = len(TINY_LABELS)
    shape: list[int | str] = (
        ["batch", 3, size, size] if layout == "nchw" else ["batch", size, size, 3]
    )
    nodes = []
    x = "pixel_values"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [x], ["chw"], perm=[0, 3, 1, 2]))
        x = "chw"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits" if not softmax else "z"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], axis=1))
    weight = (np.eye(3, n) * gain).astype(np.float32)
    bias = np.linspace(0.01, 0.0, n, dtype=np.float32)
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="ferrousforge"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    preprocess = {
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=1))
    config = {
        "model_type": "tiny-colour",
        "id2label": {str(i): label for i, label in enumerate(TINY_LABELS)},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


TINY_CLIP_WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "of",
    "picture",
    "image",
    "square",
    "circle",
    "red",
    "green",
    "blue",
    "dark",
    "light",
    "small",
    "big",
    "cat",
    "dog",
    "sky",
    "grass",
    "sea",
    "apple",
]
_CLIP_SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")


class TinyClip:
    """The weights of a tiny CLIP and the numpy forward passes that define it."""

    def __init__(
        self, *, dim: int = 16, proj: int = 8, patch: int = 8, size: int = 32, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        self.size, self.patch = size, patch
        self.vocab = {t: i for i, t in enumerate((*_CLIP_SPECIALS, *TINY_CLIP_WORDS))}
        # Text: token embeddings (dim), masked mean, a projection to ``proj``.
        self.tok = (0.3 * rng.standard_normal((len(self.vocab), dim))).astype(np.float32)
        self.text_proj = rng.standard_normal((dim, proj)).astype(np.float32)
        # Vision: a patch embedding (a convolution with stride = kernel), mean over
        # patches, a projection; the colour channels' means pass through as the first
        # three features, which the colour words are built to match.
        self.conv = (0.05 * rng.standard_normal((dim, 3, patch, patch))).astype(np.float32)
        self.conv[:3] = 0.0
        for c in range(3):
            self.conv[c, c] = 1.0 / (patch * patch)
        self.vision_proj = rng.standard_normal((dim, proj)).astype(np.float32)
        self.vision_proj[3:] *= 0.05
        # "red"/"green"/"blue": embeddings whose projection is where an image of
        # that colour lands (channel c high, the others low).
        target = np.linalg.pinv(self.text_proj)
        for c, word in enumerate(("red", "green", "blue")):
            colour = -np.ones(3, np.float32)  # normalised channel means of that image
            colour[c] = 1.0
            want = colour @ self.vision_proj[:3]
            self.tok[self.vocab[word]] = 3.0 * (want @ target)

    def ids(self, text: str) -> list[int]:
        words = text.lower().replace(",", " ").replace(".", " ").split()
        unk = self.vocab["<unk>"]
        return [
            self.vocab["<start>"],
            *(self.vocab.get(w, unk) for w in words),
            self.vocab["<end>"],
        ]

    def text(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        emb = self.tok[ids] * mask[..., None]
        pooled = emb.sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        return np.asarray(pooled @ self.text_proj, np.float32)

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        n, _, h, w = pixels.shape
        p = self.patch
        patches = pixels.reshape(n, 3, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        feats = np.einsum("nijcyx,dcyx->nijd", patches, self.conv).mean(axis=(1, 2))
        return np.asarray(feats @ self.vision_proj, np.float32)


def write_tiny_clip(folder: Path, *, seed: int = 0, max_length: int = 16) -> TinyClip:
    """A tiny CLIP at ``folder`` (created) in the split ONNX export layout; its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    clip = TinyClip(seed=seed)
    (folder / "onnx").mkdir(parents=True, exist_ok=True)
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT

    def save(graph: onnx.GraphProto, name: str) -> None:
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="ferrousforge"
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / "onnx" / name))

    text = helper.make_graph(
        [
            helper.make_node("Gather", ["tok", "input_ids"], ["emb"]),
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=f32),
            helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
            helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
            helper.make_node("Max", ["count", "one"], ["count1"]),
            helper.make_node("Div", ["summed", "count1"], ["pooled"]),
            helper.make_node("MatMul", ["pooled", "text_proj"], ["text_embeds"]),
        ],
        "tiny_clip_text",
        [
            helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", i64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("text_embeds", f32, ["batch", clip.text_proj.shape[1]])],
        initializer=[
            numpy_helper.from_array(clip.tok, "tok"),
            numpy_helper.from_array(clip.text_proj, "text_proj"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        ],
    )
    save(text, "text_model.onnx")
    p = clip.patch
    vision = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["pixel_values", "conv"], ["patches"], kernel_shape=[p, p], strides=[p, p]
            ),
            helper.make_node("GlobalAveragePool", ["patches"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "vision_proj"], ["image_embeds"]),
        ],
        "tiny_clip_vision",
        [helper.make_tensor_value_info("pixel_values", f32, ["batch", 3, clip.size, clip.size])],
        [helper.make_tensor_value_info("image_embeds", f32, ["batch", clip.vision_proj.shape[1]])],
        initializer=[
            numpy_helper.from_array(clip.conv, "conv"),
            numpy_helper.from_array(clip.vision_proj, "vision_proj"),
        ],
    )
    save(vision, "vision_model.onnx")

    tok = Tokenizer(models.WordLevel(clip.vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("removed")]
    )
    start, end = clip.vocab["<start>"], clip.vocab["<end>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", start), ("<end>", end)]
    )
    tok.save(str(folder / "tokenizer.json"))
    preprocess = {
        "do_resize": True,
        "size": {"shortest_edge": clip.size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": clip.size, "width": clip.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=1))
    config = {
        "model_type": "clip",
        "projection_dim": int(clip.text_proj.shape[1]),
        "text_config": {"max_position_embeddings": max_length},
        "vision_config": {"image_size": clip.size, "patch_size": clip.patch},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return clip


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in ("classifier", "clip")):
        print("usage: python -m engine.tinyvision DIR [classifier|clip]", file=sys.stderr)
        return 2
    folder = Path(args[0])
    if args[1:] == ["clip"]:
        write_tiny_clip(folder)
    else:
        write_tiny_classifier(folder)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
