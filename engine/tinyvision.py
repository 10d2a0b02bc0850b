"""Deterministic tiny image models in the layouts real exports ship, for tests and demos.

:func:`write_tiny_classifier` writes an image classifier folder
(``model.onnx``, ``preprocessor_config.json``, ``config.json`` with
``id2label``) whose answer is known without running it: the graph averages
each colour channel over the image and scores label ``k`` by channel ``k``,
so a red image is ``red``, a green one ``green``. Both input layouts real
graphs use are written (``nchw`` as exported from PyTorch, ``nhwc`` as from
Caffe or TensorFlow), with or without the softmax inside the graph, so the
backend's layout and score handling are proven on both sides.

Command: ``python -m engine.tinyvision DIR`` writes the classifier to ``DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["TINY_LABELS", "write_tiny_classifier"]

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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m engine.tinyvision DIR", file=sys.stderr)
        return 2
    print(write_tiny_classifier(Path(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
