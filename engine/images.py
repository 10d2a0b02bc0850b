"""Images in: decoded within bounds, then prepared exactly as a model's folder says.

A client's image (PNG, JPEG, WebP, GIF's first frame, BMP) is read by Pillow
only after its header is checked: the pixel count is capped *before* the
pixels are decoded (:data:`MAX_PIXELS`, so a 100 KB "decompression bomb" that
claims 50 000 x 50 000 pixels costs nothing), a zero-size image, a truncated
file and anything that is not an image are ``bad_request`` naming what was
wrong, never an exception from the library.

How an image becomes a model's input tensor is the model's business, so it is
read from the model folder's ``preprocessor_config.json`` (the names image
processors use: ``size``, ``resample``, ``crop_size``, ``rescale_factor``,
``image_mean``, ``image_std``, ...), never hard-coded per model
(:class:`Preprocess`). Three keys cover what those names cannot say:
``channel_order`` (``"bgr"`` for models trained on BGR input),
``jpeg_roundtrip`` (models trained on JPEG files, whose artefacts they
learned) and ``layout`` (``"nchw"``/``"nhwc"``; by default the graph's own
input shape decides).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from protocol.errors import BadRequest, ModelLoadError, TooLarge

__all__ = [
    "MAX_ASPECT",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "Preprocess",
    "decode_image",
    "embedding_input",
    "for_vision_model",
    "graph_layout",
    "open_image",
    "prepare",
    "prepare_all",
    "read_preprocess",
    "resize_plan",
]

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one encoded image
MAX_PIXELS = 40_000_000  # width x height of one image (an 8K photo is 33 M)
MAX_ASPECT = 4  # a resized image's long side is at most this many short sides (or the crop)
MAX_SIDE = 4096  # the largest size or crop side a model's config may ask for
FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})

# Pillow's resampling filters by the numbers image processor configs use.
_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class Preprocess(msgspec.Struct, frozen=True, kw_only=True):
    """A model's image preparation, as its ``preprocessor_config.json`` gives it.

    ``size`` is ``{"shortest_edge": n}`` (scale so the short side is n, keep the
    aspect) or ``{"height": h, "width": w}`` (scale to exactly that);
    ``crop_size`` likewise ``{"height", "width"}`` for a centre crop (an image
    smaller than the crop is centred on black). ``image_mean`` and ``image_std``
    are in the model's channel order, on the rescaled values.
    """

    do_resize: bool = True
    size: dict[str, int] = msgspec.field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3
    do_center_crop: bool = False
    crop_size: dict[str, int] = msgspec.field(default_factory=dict)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.5, 0.5])
    channel_order: Literal["rgb", "bgr"] = "rgb"
    jpeg_roundtrip: bool = False
    layout: Literal["", "nchw", "nhwc"] = ""

    def check(self, path: str) -> None:
        """ModelLoadError for a config that cannot describe a preparation."""
        if self.do_resize and not (
            {"shortest_edge"} <= set(self.size) or {"height", "width"} <= set(self.size)
        ):
            raise ModelLoadError(path, "config", "size needs shortest_edge, or height and width")
        if self.do_center_crop and not {"height", "width"} <= set(self.crop_size):
            raise ModelLoadError(path, "config", "crop_size needs height and width")
        if any(v <= 0 for v in (*self.size.values(), *self.crop_size.values())):
            raise ModelLoadError(path, "config", "sizes must be positive")
        if any(v > MAX_SIDE for v in (*self.size.values(), *self.crop_size.values())):
            raise ModelLoadError(path, "config", f"sizes may be at most {MAX_SIDE}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ModelLoadError(path, "config", "image_mean and image_std need 3 values (std > 0)")
        if self.resample not in _RESAMPLE:
            raise ModelLoadError(path, "config", f"unknown resample filter {self.resample}")


def read_preprocess(folder: Path, name: str = "preprocessor_config.json") -> Preprocess:
    """The folder's image preparation; ModelLoadError when it is missing or unreadable."""
    try:
        raw = json.loads((folder / name).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        # Processor configs carry many keys for other tools (processor_class, ...).
        known = {k: v for k, v in raw.items() if k in Preprocess.__struct_fields__}
        cfg = msgspec.convert(known, Preprocess)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        raise ModelLoadError(str(folder), "config", f"{name}: {exc}") from None
    cfg.check(str(folder))
    return cfg


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Any:
    """``data`` decoded to an RGB Pillow image; BadRequest / TooLarge for what cannot be."""
    from PIL import Image, UnidentifiedImageError  # imported where images are read only

    if not data:
        raise BadRequest("the image is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise TooLarge(f"the image takes {len(data)} bytes; one image may take {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=sorted(FORMATS))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise BadRequest("the image has no pixels")
            if width * height > max_pixels:
                raise TooLarge(
                    f"the image is {width}x{height} pixels; one image may have {max_pixels}"
                )
            img.seek(0)  # an animation: its first frame
            img.load()
            return img.convert("RGB")
    except (BadRequest, TooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"the image has more pixels than the {max_pixels} one may have") from None
    except UnidentifiedImageError:
        raise BadRequest(
            "the data is not an image this server reads (PNG, JPEG, WebP, GIF, BMP)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadRequest(f"the image could not be decoded: {exc}") from None


def for_vision_model(data: bytes, max_side: int = 1024) -> bytes:
    """``data`` checked (:func:`open_image`) and re-encoded as PNG with its long side at
    most ``max_side``: what a vision language model is sent. Its encoder resizes to a
    few hundred pixels anyway; this bounds what crosses to the worker and what the
    worker decodes, and a hostile file is refused here, not in native code."""
    from PIL import Image

    img = open_image(data)
    scale = max_side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, resample=Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def for_sending(data: bytes, max_side: int = 1024, max_bytes: int = 512 * 1024) -> bytes:
    """``data`` as a client sends it to a vision model over one WebSocket frame: as it is
    when it is small enough, else checked (:func:`open_image`), scaled to ``max_side``
    on its long side and encoded as JPEG (what the model's encoder reads is a few
    hundred pixels; the server sizes it again anyway)."""
    from PIL import Image

    img = open_image(data)
    if len(data) <= max_bytes and max(img.size) <= max_side:
        return data
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decode_image(text: str) -> bytes:
    """The bytes of an image sent as base64 or a ``data:image/...;base64,`` URL."""
    import base64
    import binascii

    body = text
    if text.startswith("data:"):
        head, sep, body = text.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise BadRequest("an image data URL must be data:image/...;base64,...")
    if len(body) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise TooLarge(f"the image is over {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("an image must be base64 (or a data:image/...;base64 URL)") from None


def embedding_input(text: str) -> str | bytes:
    """An embedding input as sent: a ``data:image/...;base64,`` URL is an image (its
    bytes), anything else is text."""
    return decode_image(text) if text.startswith("data:image/") else text


def resize_plan(
    size: tuple[int, int], edge: int, crop: tuple[int, int] = (0, 0)
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Where to cut a ``size`` (width, height) image and what to scale the cut to so
    its short side becomes ``edge``: the box (left, top, right, bottom) and target.

    Scaling a 4000x1 image's short side to 224 would make an 896 000 x 224 image
    (3.6 GB as floats) only for a centre crop to keep 224x224 of it. The long side
    of the target is therefore capped at ``MAX_ASPECT`` short sides (or the crop,
    when larger), and the original is centre-cut to the part that lands inside: a
    centre crop of the result is the same pixels either way.
    """
    w, h = size
    scale = edge / min(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    cap_w, cap_h = max(edge * MAX_ASPECT, crop[0]), max(edge * MAX_ASPECT, crop[1])
    left, top, right, bottom = 0, 0, w, h
    if tw > cap_w:
        keep = max(1, min(w, round(cap_w / scale)))
        left = (w - keep) // 2
        right, tw = left + keep, cap_w
    if th > cap_h:
        keep = max(1, min(h, round(cap_h / scale)))
        top = (h - keep) // 2
        bottom, th = top + keep, cap_h
    return (left, top, right, bottom), (tw, th)


def prepare(img: Any, cfg: Preprocess, layout: Literal["nchw", "nhwc"]) -> np.ndarray:
    """One image as the model's float32 input (without the batch axis)."""
    from PIL import Image

    resample = getattr(Image.Resampling, _RESAMPLE[cfg.resample])
    if cfg.do_resize:
        if "shortest_edge" in cfg.size:
            crop = (cfg.crop_size.get("width", 0), cfg.crop_size.get("height", 0))
            box, target = resize_plan(img.size, cfg.size["shortest_edge"], crop)
            if box != (0, 0, *img.size):
                img = img.crop(box)
        else:
            target = (cfg.size["width"], cfg.size["height"])
        img = img.resize(target, resample=resample)
    if cfg.jpeg_roundtrip:
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    arr = np.asarray(img, dtype=np.float32)  # H, W, 3 in RGB
    if cfg.do_center_crop:
        ch, cw = cfg.crop_size["height"], cfg.crop_size["width"]
        h, w = arr.shape[:2]
        if h < ch or w < cw:  # smaller than the crop: padded with black, centred
            padded = np.zeros((max(h, ch), max(w, cw), 3), np.float32)
            top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
            padded[top : top + h, left : left + w] = arr
            arr, h, w = padded, padded.shape[0], padded.shape[1]
        top, left = (h - ch) // 2, (w - cw) // 2
        arr = arr[top : top + ch, left : left + cw]
    if cfg.channel_order == "bgr":
        arr = arr[:, :, ::-1]
    if cfg.do_rescale:
        arr = arr * np.float32(cfg.rescale_factor)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, np.float32)
        std = np.asarray(cfg.image_std, np.float32)
        arr = (arr - mean) / std
    if layout == "nchw":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def prepare_all(
    images: list[bytes], cfg: Preprocess, layout: Literal["nchw", "nhwc"], first: int = 0
) -> list[np.ndarray]:
    """Every image decoded and prepared; an unreadable one is an error naming its index
    (counted from ``first``: the request's numbering when this is one batch of it)."""
    out = []
    for i, data in enumerate(images, first):
        try:
            out.append(prepare(open_image(data), cfg, layout))
        except (BadRequest, TooLarge) as exc:
            raise type(exc)(f"image {i}: {exc.message}") from None
    return out


def graph_layout(shape: list[Any], cfg: Preprocess, where: str) -> Literal["nchw", "nhwc"]:
    """The image layout of a graph input of ``shape`` (the config's, else where the 3
    colour channels are); ModelLoadError for an input that is not a batch of images."""
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise ModelLoadError(where, "layout", f"the graph's input {shape} is not a batch of images")
    return cfg.layout or ("nchw" if shape[1] == 3 else "nhwc")
