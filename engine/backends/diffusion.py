"""Image generation through onnxruntime: a denoiser graph sampled as ``diffusion.json`` says.

A job makes ``n`` images together: it reads the prompt (a class number for a
class-conditioned model, the text encoder's embedding for a text-conditioned
one), draws the starting noise from the request's seed (drawn when the
request gives none, and returned, so the same call makes the same images),
then runs one sampler step per worker step (:mod:`engine.sigmas`): each is one
UNet call on the whole batch, reported as progress. The decoder (when there
is one) and PNG encoding are the last step. Work is bounded: ``steps`` up to
``max_steps``, ``n`` up to ``max_images``, sizes only among those the model makes.
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.backends.base import ImageGenerator, ImagesJob, LoadParams
from engine.backends.diffusion_entry import DiffusionConfig, read_diffusion
from engine.backends.onnxsession import open_session
from engine.requests import ImageOptions
from engine.sigmas import consistency_renoise, euler_step, karras_sigmas
from protocol.errors import BadRequest, ModelLoadError

__all__ = ["OnnxDiffusion"]


def _png(pixels: np.ndarray) -> bytes:
    """One image, channels first, values 0..255, as a PNG file."""
    from PIL import Image

    array = np.ascontiguousarray(pixels.transpose(1, 2, 0))
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class OnnxDiffusion(ImageGenerator):
    name = "onnx"

    def __init__(self, folder: Path, config: DiffusionConfig, params: LoadParams) -> None:
        self.config = config
        self.n_ctx = 0
        self._unet = open_session(folder / config.unet, params)
        self.providers = list(self._unet.get_providers())
        names = {i.name for i in self._unet.get_inputs()}
        missing = set(config.inputs.values()) - names
        if missing:
            raise ModelLoadError(
                str(folder), "layout", f"the UNet has no input {sorted(missing)[0]!r}"
            )
        self._unet_out = config.output or self._unet.get_outputs()[0].name
        self._text: ort.InferenceSession | None = None
        self._tokenizer: Any = None
        if config.text_encoder:
            from tokenizers import Tokenizer

            self._text = open_session(folder / config.text_encoder, params)
            self._tokenizer = Tokenizer.from_file(str(folder / config.tokenizer))
            self._tokenizer.no_padding()
            self._tokenizer.no_truncation()
        self._decoder = open_session(folder / config.decoder, params) if config.decoder else None

    @classmethod
    def load(cls, path: str, params: LoadParams) -> OnnxDiffusion:
        folder = Path(path)
        return cls(folder, read_diffusion(folder), params)

    def free(self) -> None:
        pass  # the sessions go with the object

    def images_job(self, prompt: str, options: ImageOptions) -> ImagesJob:
        cfg = self.config
        if not 1 <= options.n <= cfg.max_images:
            raise BadRequest(f"n must be within 1..{cfg.max_images} for this model")
        steps = options.steps or cfg.steps
        if not 1 <= steps <= cfg.max_steps:
            raise BadRequest(f"steps must be within 1..{cfg.max_steps} for this model")
        size = (options.width or cfg.size[0], options.height or cfg.size[1])
        allowed = cfg.sizes or [cfg.size]
        if size not in [tuple(s) for s in allowed]:
            sizes = ", ".join(f"{w}x{h}" for w, h in allowed)
            raise BadRequest(f"this model makes images of {sizes}, not {size[0]}x{size[1]}")
        if options.seed is not None and not 0 <= options.seed < 2**32:
            raise BadRequest("seed must be within 0..2**32-1")
        klass = self._class_of(prompt) if cfg.classes else None
        seed = options.seed if options.seed is not None else secrets.randbelow(2**32)
        return self._job(prompt, klass, options.n, steps, size, seed)

    def _class_of(self, prompt: str) -> int | None:
        text = prompt.strip()
        if not text:
            return None  # drawn from the seed
        if not text.isdigit() or not 1 <= int(text) <= self.config.classes:
            raise BadRequest(
                f"this model is conditioned on a class: the prompt is a number within "
                f"1..{self.config.classes} (or empty for one drawn from the seed)"
            )
        return int(text)

    def _job(
        self, prompt: str, klass: int | None, n: int, steps: int, size: tuple[int, int], seed: int
    ) -> ImagesJob:
        cfg = self.config
        rng = np.random.default_rng(seed)
        channels = cfg.sample_shape[0]
        h, w = size[1] // cfg.decoder_scale, size[0] // cfg.decoder_scale
        feeds: dict[str, np.ndarray] = {}
        if "class" in cfg.inputs:
            classes = (
                np.full(n, klass) if klass is not None else rng.integers(1, cfg.classes + 1, n)
            )
            feeds[cfg.inputs["class"]] = ((classes - 1) / (cfg.classes - 1)).astype(np.float32)
        if "text" in cfg.inputs:
            feeds[cfg.inputs["text"]] = np.repeat(self._encode(prompt), n, axis=0)
        sigmas = karras_sigmas(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        x = rng.standard_normal((n, channels, h, w)).astype(np.float32) * np.float32(sigmas[0])
        denoised = x
        for i, sigma in enumerate(sigmas):
            feeds[cfg.inputs["sample"]] = x
            feeds[cfg.inputs["sigma"]] = np.full(n, sigma, np.float32)
            denoised = np.asarray(self._unet.run([self._unet_out], feeds)[0], np.float32)
            if denoised.shape != x.shape:
                raise BadRequest(f"the UNet gave {denoised.shape} for a sample of {x.shape}")
            nxt = float(sigmas[i + 1]) if i + 1 < len(sigmas) else 0.0
            if cfg.sampler == "euler":
                x = euler_step(x, denoised, float(sigma), nxt)
            elif nxt > 0:
                noise = rng.standard_normal(x.shape).astype(np.float32)
                x = consistency_renoise(denoised, nxt, cfg.sigma_min, noise)
            yield i + 1, steps
        out = x if cfg.sampler == "euler" else denoised
        if self._decoder is not None:
            name = self._decoder.get_inputs()[0].name
            out = np.asarray(self._decoder.run(None, {name: out})[0], np.float32)
        lo, hi = cfg.output_range
        pixels = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
        pixels = np.rint(pixels * 255).astype(np.uint8)
        if pixels.shape[2:] != (size[1], size[0]):
            raise BadRequest(f"the model made {pixels.shape[3]}x{pixels.shape[2]} images")
        return [_png(p) for p in pixels], seed

    def _encode(self, prompt: str) -> np.ndarray:
        assert self._text is not None
        ids = self._tokenizer.encode(prompt or "").ids[: self.config.max_length]
        feed = {"input_ids": np.array([ids], np.int64)}
        names = {i.name for i in self._text.get_inputs()}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, len(ids)), np.int64)
        name = self.config.text_output or self._text.get_outputs()[0].name
        return np.asarray(self._text.run([name], feed)[0], np.float32)
