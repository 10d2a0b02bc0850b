"""Registry entry of image generation models: a denoiser graph and how to sample from it.

An image generator is a folder with ``diffusion.json`` (:class:`DiffusionConfig`)
beside its graphs: the UNet (or any denoiser: a noisy sample and its noise level
in, the clean sample predicted out), optionally a text encoder with its
``tokenizer.json`` (the prompt's embedding conditions the UNet), a class input
(the prompt is then a class number) and a decoder (latents to pixels). The
sampler and its noise schedule are named in the file (:mod:`engine.sigmas`), so
a one-step consistency model and a many-step diffusion model are the same
backend. The store's catalog writes the file for a model that ships as a bare
graph (``terrain-diffusion``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.backends.onnx_entry import OnnxOptions
from engine.memory import COMPUTE_RESERVE, folder_bytes
from protocol.errors import ModelLoadError

__all__ = ["CONFIG", "DiffusionConfig", "DiffusionEntry", "read_diffusion"]

CONFIG = "diffusion.json"


class DiffusionConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``diffusion.json``: the graphs, their input names, the sampler and the sizes.

    ``inputs`` maps roles to the UNet's input names: ``sample`` and ``sigma``
    always, ``class`` for a class-conditioned model (fed ``(k - 1) / (classes - 1)``
    for class ``k``), ``text`` for one conditioned on the text encoder's output.
    ``sample_shape`` is what the UNet denoises (channels, height, width);
    ``decoder_scale`` is how many pixels a sample cell becomes through the
    decoder (1 without one). ``sizes`` lists the ``[width, height]`` images the
    model makes (empty: only its own). The output is read as values in
    ``output_range`` and written as 8-bit PNG (one channel: grey, three: RGB).
    """

    unet: str = "unet.onnx"
    sample_shape: tuple[int, int, int]
    inputs: dict[str, str] = msgspec.field(
        default_factory=lambda: {"sample": "sample", "sigma": "sigma"}
    )
    output: str = ""
    sampler: Literal["euler", "consistency"] = "euler"
    steps: int = 20
    max_steps: int = 50
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    classes: int = 0
    text_encoder: str = ""
    text_output: str = ""
    tokenizer: str = "tokenizer.json"
    max_length: int = 77
    decoder: str = ""
    decoder_scale: int = 1
    output_range: tuple[float, float] = (-1.0, 1.0)
    sizes: list[tuple[int, int]] = msgspec.field(default_factory=list)
    max_images: int = 4

    def check(self, folder: Path) -> None:
        path = str(folder)
        for name in (self.unet, self.text_encoder, self.decoder):
            if name and not (folder / name).is_file():
                raise ModelLoadError(path, "missing", f"{CONFIG} names {name}, which is missing")
        if self.text_encoder and not (folder / self.tokenizer).is_file():
            raise ModelLoadError(path, "tokenizer", f"the text encoder needs {self.tokenizer}")
        if not {"sample", "sigma"} <= set(self.inputs):
            raise ModelLoadError(path, "config", "inputs must name the sample and sigma inputs")
        if ("class" in self.inputs) != (self.classes > 1):
            raise ModelLoadError(path, "config", "a class input needs classes (2 or more)")
        if ("text" in self.inputs) != bool(self.text_encoder):
            raise ModelLoadError(path, "config", "a text input needs a text_encoder")
        if min(self.sample_shape) < 1 or self.sample_shape[0] not in (1, 3, 4):
            raise ModelLoadError(path, "config", "sample_shape is channels, height, width")
        if not 1 <= self.steps <= self.max_steps or not 0 < self.sigma_min <= self.sigma_max:
            raise ModelLoadError(
                path, "config", "need 1 <= steps <= max_steps, 0 < sigma_min <= sigma_max"
            )
        if self.decoder_scale < 1 or self.max_images < 1:
            raise ModelLoadError(path, "config", "decoder_scale and max_images must be positive")

    @property
    def size(self) -> tuple[int, int]:
        """The default ``(width, height)``."""
        if self.sizes:
            return self.sizes[0]
        _, h, w = self.sample_shape
        return (w * self.decoder_scale, h * self.decoder_scale)


def read_diffusion(folder: Path) -> DiffusionConfig:
    """The folder's ``diffusion.json``, checked; ModelLoadError when it is missing or bad."""
    try:
        config = msgspec.json.decode((folder / CONFIG).read_bytes(), type=DiffusionConfig)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelLoadError(str(folder), "config", f"{CONFIG}: {exc}") from None
    config.check(folder)
    return config


class DiffusionEntry(BackendEntry):
    name = "onnx"
    kinds = frozenset({Kind.IMAGE_GENERATE})
    layout = "a folder with diffusion.json and its ONNX graphs"
    package = "onnxruntime"
    options = OnnxOptions
    module = "engine.backends.diffusion"
    cls = "OnnxDiffusion"

    def claims(self, path: str) -> bool:
        return (Path(path) / CONFIG).is_file()

    def inspect(self, path: str) -> Found:
        read_diffusion(Path(path))
        return Found(path, self.name, frozenset({Kind.IMAGE_GENERATE}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        per_worker = folder_bytes(found.path) + 8 * COMPUTE_RESERVE
        return Sizing(1, inputs.workers * per_worker)
