"""Images into a llama.cpp model: its projector, through llama.cpp's multimodal library.

A vision language model is a text model plus a projector (an image encoder
and a projection into the text model's embedding space). llama.cpp's
``libmtmd`` reads the projector file, turns a prompt with image markers into
chunks (text tokens, and per image a chunk of embeddings), encodes an image
chunk and decodes its embeddings into a sequence of the text model's context.

The backend keeps prompts as token lists (its slots, prefix reuse and step
plans are written for them), so :meth:`VisionInput.tokenize` stands each image
in the list as ``n`` copies of an id past the vocabulary, one per position
the image takes, and keeps the image's chunk under that id until the
sequence ends (:meth:`release`); the step that reaches those ids decodes the
image (:meth:`decode`) instead of tokens. Images arrive already checked and
sized by the gateway (:func:`engine.images.for_vision_model`); Pillow reads
them here into the RGB pixels the library takes.
"""

from __future__ import annotations

import ctypes
import itertools
from collections import OrderedDict
from typing import Any, cast

import llama_cpp.mtmd_cpp as mtmd

from engine.images import open_image
from protocol.errors import BadRequest, ModelLoadError, Overloaded

__all__ = ["MAX_CHUNKS", "VisionInput"]

_IMAGE_CHUNK = 1  # MTMD_INPUT_CHUNK_TYPE_IMAGE
MAX_CHUNKS = 256  # images kept for prompts that have not finished


class VisionInput:
    """A model's projector, loaded (see the module)."""

    def __init__(
        self, model: object, projector: str, n_threads: int, first_id: int, log: object
    ) -> None:
        """``log``: llama.cpp's log callback the backend uses (the library's goes there)."""
        mtmd.mtmd_log_set(cast(Any, log), None)
        mtmd.mtmd_helper_log_set(cast(Any, log), None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        ctx = mtmd.mtmd_init_from_file(projector.encode(), model, params)
        if not ctx:
            raise ModelLoadError(projector, "backend", "llama.cpp could not load the projector")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise ModelLoadError(projector, "backend", "the projector reads no images")
        self._ctx = ctx
        self.marker = mtmd.mtmd_default_marker().decode()
        self._first = first_id  # ids from here on stand for images
        self._ids = itertools.count(first_id)
        # placeholder id -> its image chunk (owned), oldest first: a prompt that never
        # starts (refused as too long, cancelled while queued) leaves its chunks here
        # until MAX_CHUNKS newer ones push them out.
        self._chunks: OrderedDict[int, Any] = OrderedDict()

    def tokenize(self, text: str, images: list[bytes], add_special: bool) -> list[int]:
        """``text`` (with one marker per image) as tokens, each image as placeholders."""
        bitmaps = []
        try:
            for i, data in enumerate(images):
                img = open_image(data)
                pixels = img.tobytes()
                buf = (ctypes.c_ubyte * len(pixels)).from_buffer_copy(pixels)
                bitmap = mtmd.mtmd_bitmap_init(img.width, img.height, buf)
                if not bitmap:
                    raise BadRequest(f"image {i} could not be read")
                bitmaps.append(bitmap)
            return self._tokenize(text, bitmaps, add_special)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _tokenize(self, text: str, bitmaps: list[Any], add_special: bool) -> list[int]:
        raw = text.encode()
        given = mtmd.mtmd_input_text(raw, len(raw), add_special, True)
        chunks = mtmd.mtmd_input_chunks_init()
        arr = (ctypes.c_void_p * max(1, len(bitmaps)))(*bitmaps)
        try:
            rc = mtmd.mtmd_tokenize(
                self._ctx, chunks, ctypes.byref(given), cast(Any, arr), len(bitmaps)
            )
            if rc == 1:
                raise BadRequest("the prompt's image markers and its images do not match")
            if rc != 0:
                raise BadRequest(f"the images could not be prepared for the model ({rc})")
            tokens: list[int] = []
            for k in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, k)
                if mtmd.mtmd_input_chunk_get_type(chunk) == _IMAGE_CHUNK:
                    ident = next(self._ids)
                    self._chunks[ident] = mtmd.mtmd_input_chunk_copy(chunk)
                    while len(self._chunks) > MAX_CHUNKS:
                        mtmd.mtmd_input_chunk_free(self._chunks.popitem(last=False)[1])
                    tokens += [ident] * int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
                else:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens += [int(ptr[j]) for j in range(n.value)]
            return tokens
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def is_image(self, token: int) -> bool:
        return token >= self._first

    def decode(self, lctx: object, ident: int, n_past: int, seq: int, n_batch: int) -> int:
        """Encode image ``ident`` and decode it into sequence ``seq`` from ``n_past``; the
        position after it."""
        if ident not in self._chunks:
            raise Overloaded("the image waited too long and was dropped; send it again")
        new_n_past = ctypes.c_int32(0)
        rc = mtmd.mtmd_helper_eval_chunk_single(
            self._ctx, lctx, self._chunks[ident], n_past, seq, n_batch, False,
            ctypes.byref(new_n_past),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"decoding an image failed ({rc})")
        return int(new_n_past.value)

    def release(self, tokens: list[int]) -> None:
        """Free the image chunks ``tokens`` refer to (their sequence ended)."""
        for ident in set(tokens):
            chunk = self._chunks.pop(ident, None)
            if chunk is not None:
                mtmd.mtmd_input_chunk_free(chunk)

    def free(self) -> None:
        self.release(list(self._chunks))
        mtmd.mtmd_free(self._ctx)
