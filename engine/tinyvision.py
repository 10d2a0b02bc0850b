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

:func:`write_tiny_diffusion` writes a text-to-image pipeline (text encoder,
UNet sampled in a loop, decoder) in the ``diffusion.json`` layout, whose
images are the colour the prompt names.

Command: ``python -m engine.tinyvision DIR [classifier|clip|diffusion]`` writes one to ``DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "TINY_CLIP_WORDS",
    "TINY_DIFFUSION_SD",
    "TINY_LABELS",
    "TinyClip",
    "tiny_colour",
    "write_tiny_classifier",
    "write_tiny_clip",
    "write_tiny_diffusion",
]

TINY_LABELS = ("red", "green", "blue")
_OPSET = 17


def _save(graph: Any, path: Path) -> None:
    """A graph as a checked model file (opset 17, IR 8: what onnxruntime's wheels read)."""
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="ferrousforge"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


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
    _save(graph, folder / "model.onnx")
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
        _save(graph, folder / "onnx" / name)

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


TINY_DIFFUSION_SD = 0.1  # the spread of the tiny diffusion model's "data" around its colour


def tiny_colour(words: list[str]) -> np.ndarray:
    """The colour (RGB in -1..1) the tiny diffusion model paints for a prompt's words: the
    mean over its tokens (start and end markers included) of each colour word's colour."""
    table = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1)}
    rows = [(0, 0, 0), *(table.get(w, (0, 0, 0)) for w in words), (0, 0, 0)]
    return np.asarray(np.asarray(rows, np.float32).mean(axis=0), np.float32)


def write_tiny_diffusion(folder: Path) -> Path:
    """A tiny text-to-image pipeline at ``folder`` (created): text encoder -> UNet loop ->
    decoder, in the ``diffusion.json`` layout.

    The text encoder averages per-token colours (``tiny_colour``); the UNet is the
    exact denoiser of images whose every pixel is that colour plus noise of spread
    :data:`TINY_DIFFUSION_SD`, ``D(x, s) = c + sd^2 / (sd^2 + s^2) (x - c)``, on an
    8x8 latent; the decoder scales the latent up 4x to a 32x32 RGB image. So "a red
    square" comes out red, and a seed fixes every pixel.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    vocab = {t: i for i, t in enumerate((*_CLIP_SPECIALS, *TINY_CLIP_WORDS))}

    def save(graph: onnx.GraphProto, name: str) -> None:
        _save(graph, folder / name)

    colours = np.zeros((len(vocab), 3), np.float32)
    for word, rgb in (("red", (1, -1, -1)), ("green", (-1, 1, -1)), ("blue", (-1, -1, 1))):
        colours[vocab[word]] = rgb
    save(
        helper.make_graph(
            [
                helper.make_node("Gather", ["colours", "input_ids"], ["per_token"]),
                helper.make_node(
                    "ReduceMean", ["per_token"], ["text_embeds"], axes=[1], keepdims=0
                ),
            ],
            "tiny_text_encoder",
            [helper.make_tensor_value_info("input_ids", i64, [1, "sequence"])],
            [helper.make_tensor_value_info("text_embeds", f32, [1, 3])],
            initializer=[numpy_helper.from_array(colours, "colours")],
        ),
        "text_encoder.onnx",
    )
    sd2 = np.array(TINY_DIFFUSION_SD**2, np.float32)
    save(
        helper.make_graph(
            [
                helper.make_node("Reshape", ["sigma", "shape4"], ["s4"]),
                helper.make_node("Mul", ["s4", "s4"], ["s2"]),
                helper.make_node("Add", ["s2", "sd2"], ["den"]),
                helper.make_node("Div", ["sd2", "den"], ["keep"]),
                helper.make_node("Reshape", ["encoder_hidden_states", "shape_c"], ["c4"]),
                helper.make_node("Sub", ["sample", "c4"], ["diff"]),
                helper.make_node("Mul", ["keep", "diff"], ["kept"]),
                helper.make_node("Add", ["c4", "kept"], ["denoised"]),
            ],
            "tiny_unet",
            [
                helper.make_tensor_value_info("sample", f32, ["batch", 3, 8, 8]),
                helper.make_tensor_value_info("sigma", f32, ["batch"]),
                helper.make_tensor_value_info("encoder_hidden_states", f32, ["batch", 3]),
            ],
            [helper.make_tensor_value_info("denoised", f32, ["batch", 3, 8, 8])],
            initializer=[
                numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
                numpy_helper.from_array(np.array([-1, 3, 1, 1], np.int64), "shape_c"),
                numpy_helper.from_array(sd2, "sd2"),
            ],
        ),
        "unet.onnx",
    )
    save(
        helper.make_graph(
            [helper.make_node("Resize", ["latent", "", "scales"], ["image"], mode="nearest")],
            "tiny_decoder",
            [helper.make_tensor_value_info("latent", f32, ["batch", 3, 8, 8])],
            [helper.make_tensor_value_info("image", f32, ["batch", 3, 32, 32])],
            initializer=[numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales")],
        ),
        "decoder.onnx",
    )
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("removed")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>",
        special_tokens=[("<start>", vocab["<start>"]), ("<end>", vocab["<end>"])],
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "unet": "unet.onnx",
        "sample_shape": [3, 8, 8],
        "inputs": {"sample": "sample", "sigma": "sigma", "text": "encoder_hidden_states"},
        "output": "denoised",
        "sampler": "euler",
        "steps": 4,
        "max_steps": 16,
        "sigma_min": 0.02,
        "sigma_max": 10.0,
        "text_encoder": "text_encoder.onnx",
        "text_output": "text_embeds",
        "decoder": "decoder.onnx",
        "decoder_scale": 4,
        "sizes": [[32, 32]],
        "output_range": [-1.0, 1.0],
    }
    (folder / "diffusion.json").write_text(json.dumps(config, indent=1))
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    kinds = ("classifier", "clip", "diffusion")
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in kinds):
        print("usage: python -m engine.tinyvision DIR [classifier|clip|diffusion]", file=sys.stderr)
        return 2
    folder = Path(args[0])
    if args[1:] == ["clip"]:
        write_tiny_clip(folder)
    elif args[1:] == ["diffusion"]:
        write_tiny_diffusion(folder)
    else:
        write_tiny_classifier(folder)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
