"""Registry entries of the ONNX backends: decoder folders (text) and encoder folders (embeddings).

An ONNX model is a folder holding ``model.onnx`` and ``tokenizer.json``; one
that also holds ``pooling.json`` (written by
:func:`engine.onnx.bert_convert.convert_bert`) is an encoder, served by
:class:`~engine.backends.onnxembed.OnnxEncoderBackend`; any other is a
decoder, served by :class:`~engine.backends.onnxrt.OnnxBackend`. Both are
the ``onnx`` backend to a user, and both take :class:`OnnxOptions`.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.memory import estimate_encoder_bytes, estimate_onnx_bytes
from engine.settings import ONNX_SEQS
from protocol.errors import ModelLoadError

__all__ = ["OnnxDecoderEntry", "OnnxEncoderEntry", "OnnxOptions", "check_onnx_folder"]


class OnnxOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """onnxruntime session options for ONNX models (the ``[onnx]`` table of the configuration).

    ``spinning`` lets intra-op threads busy-wait for the next operator of a
    run instead of sleeping between them: a decode step is hundreds of small
    operators, and waking a sleeping thread for each one cost SmolLM2's 4-bit
    graph ~35 % of its step on 2 cores (one stream 157 against 101 tokens/s,
    8 rows through the server 334 against 261). The threads stop spinning the
    moment a run returns (onnxruntime's ``session.force_spinning_stop``), so
    a worker between steps or idle takes no CPU from the gateway or other
    workers (a llama.cpp worker measured in the same run: 106 tokens/s with
    spinning on, 104 with it off). Turn it off on a box whose cores are
    oversubscribed by other work.

    ``prefix_cache_mb`` bounds the keys and values a worker keeps from
    finished sequences so that a later prompt starting with the same tokens
    (a shared system prompt, the next turn of a conversation, a retried
    request) copies them instead of reading that part again; 0 keeps none
    (prefixes are still shared between running sequences, which costs no
    memory). ``prefix_reuse = False`` turns reuse off altogether: how soon a
    first token comes tells whether another request began the same way, which
    a server shared by parties who must not learn of each other's prompts
    may not want.
    """

    spinning: bool = True
    graph_optimization: str = "all"  # all | extended | basic | disabled
    # Execution providers in order of preference ("cuda", "tensorrt", "openvino",
    # "rocm", "directml", "coreml", "cpu", or onnxruntime's own names); those the
    # installed onnxruntime lacks are skipped with a warning, and the CPU is always
    # the last resort. ``tensorrt_cache``: where TensorRT keeps built engines.
    providers: list[str] = msgspec.field(default_factory=lambda: ["cpu"])
    tensorrt_cache: str = ""
    memory_arena: bool = True
    prefix_cache_mb: int = 128
    prefix_reuse: bool = True


def check_onnx_folder(path: str) -> Path:
    """Validate a model folder before it reaches onnxruntime; raise ModelLoadError."""
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(path, "missing", "no such folder")
    if not folder.is_dir():
        raise ModelLoadError(path, "not_onnx", "an ONNX model is a folder with model.onnx")
    if not (folder / "model.onnx").is_file():
        raise ModelLoadError(path, "not_onnx", "the folder has no model.onnx")
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(path, "tokenizer", "the folder has no tokenizer.json")
    return folder


class _OnnxEntry(BackendEntry):
    name = "onnx"
    package = "onnxruntime"
    options = OnnxOptions


class OnnxEncoderEntry(_OnnxEntry):
    kinds = frozenset({Kind.EMBED})
    layout = "a folder with model.onnx, tokenizer.json and pooling.json"
    module = "engine.backends.onnxembed"
    cls = "OnnxEncoderBackend"

    def claims(self, path: str) -> bool:
        folder = Path(path)
        return (folder / "model.onnx").is_file() and (folder / "pooling.json").is_file()

    def inspect(self, path: str) -> Found:
        check_onnx_folder(path)
        return Found(path, self.name, frozenset({Kind.EMBED}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        return Sizing(1, estimate_encoder_bytes(found.path, workers=inputs.workers))


class OnnxDecoderEntry(_OnnxEntry):
    kinds = frozenset({Kind.TEXT})
    layout = "a folder with model.onnx and tokenizer.json"
    module = "engine.backends.onnxrt"
    cls = "OnnxBackend"

    def claims(self, path: str) -> bool:
        return (Path(path) / "model.onnx").is_file()

    def inspect(self, path: str) -> Found:
        check_onnx_folder(path)
        return Found(path, self.name, frozenset({Kind.TEXT}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        opts = inputs.options if isinstance(inputs.options, OnnxOptions) else OnnxOptions()
        n_seq = inputs.seqs_cap or ONNX_SEQS
        kept = max(0, opts.prefix_cache_mb) * 2**20 if opts.prefix_reuse else 0
        size = estimate_onnx_bytes(
            found.path, n_ctx=inputs.n_ctx, workers=inputs.workers, n_seq=n_seq, prefix_cache=kept
        )
        return Sizing(n_seq, size)
