"""Registry entries of the GGUF backends: llama.cpp (the default) and ctransformers.

A GGUF file is checked from its header alone (:mod:`engine.gguf_header`):
the architecture must be one the backend runs, before native code sees it.
llama.cpp runs as many sequences per worker as half of the memory budget
holds in context windows (:func:`engine.memory.sequences_for`), up to
``SEQS_PER_THREAD`` per thread; ctransformers decodes one at a time.

A vision language model is a folder of two GGUF files: the text model and its
projector (``general.architecture`` ``clip``: the image encoder and the
projection into the text model's embeddings), as llama.cpp's converters write
them and as the store lays out a model created FROM both (:func:`vision_pair`).
"""

from __future__ import annotations

from pathlib import Path

from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.gguf_header import KNOWN_ARCHITECTURES, GGUFHeader, read_gguf_header
from engine.memory import estimate_model_bytes, sequences_for
from engine.settings import SEQS_PER_THREAD
from protocol.errors import ModelLoadError

__all__ = [
    "PROJECTOR_ARCHITECTURE",
    "CTransformersEntry",
    "LlamaCppEntry",
    "check_model_file",
    "vision_pair",
]

PROJECTOR_ARCHITECTURE = "clip"  # what llama.cpp's multimodal projectors call themselves

# What each backend can run, checked before any native code sees the file.
ARCHITECTURES: dict[str, frozenset[str]] = {
    "llama_cpp": KNOWN_ARCHITECTURES,
    "ctransformers": frozenset({"llama"}),
}


def vision_pair(folder: str | Path) -> tuple[Path, Path] | None:
    """(model, projector) of a vision language model's folder, else None: exactly two
    ``.gguf`` files, one a projector. Headers only; unreadable files are not a pair."""
    root = Path(folder)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) != 2:
        return None
    try:
        archs = [read_gguf_header(str(p)).architecture for p in files]
    except (ModelLoadError, OSError):
        return None
    if archs.count(PROJECTOR_ARCHITECTURE) != 1:
        return None
    model, projector = files if archs[1] == PROJECTOR_ARCHITECTURE else files[::-1]
    return model, projector


def check_model_file(path: str, backend: str) -> GGUFHeader:
    """Validate ``path`` for ``backend`` without loading it; raise ModelLoadError.

    Cheap (header only), so the engine client runs it before asking workers to
    load, and backends run it again before handing the file to native code.
    """
    header = read_gguf_header(path)
    archs = ARCHITECTURES.get(backend, frozenset())
    if header.architecture not in archs:
        raise ModelLoadError(
            path,
            "unsupported_architecture",
            f"architecture {header.architecture!r} is not supported by the {backend} backend",
        )
    if backend == "ctransformers" and "tokenizer.ggml.scores" not in header.array_lengths:
        raise ModelLoadError(
            path, "unsupported_vocabulary", "ctransformers needs tokenizer.ggml.scores"
        )
    return header


class _GgufEntry(BackendEntry):
    def claims(self, path: str) -> bool:
        # Anything that is not a folder: a file that is not GGUF gets the header's
        # typed error (not_gguf, missing, ...) from inspect.
        return not Path(path).is_dir()

    def inspect(self, path: str) -> Found:
        header = check_model_file(path, self.name)
        return Found(path, self.name, frozenset({Kind.TEXT, Kind.EMBED}), header)


class LlamaCppEntry(_GgufEntry):
    name = "llama_cpp"
    kinds = frozenset({Kind.TEXT, Kind.EMBED})
    layout = "a GGUF file, or a folder of a GGUF model and its projector (vision)"
    package = "llama_cpp"
    module = "engine.backends.llamacpp"
    cls = "LlamaCppBackend"

    def claims(self, path: str) -> bool:
        return super().claims(path) or vision_pair(path) is not None

    def inspect(self, path: str) -> Found:
        pair = vision_pair(path)
        if pair is None:
            return super().inspect(path)
        header = check_model_file(str(pair[0]), self.name)
        return Found(path, self.name, frozenset({Kind.TEXT}), header)

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        assert found.header is not None
        if inputs.seqs_cap:
            n_seq = inputs.seqs_cap
        elif inputs.kv_unified:
            n_seq = SEQS_PER_THREAD * inputs.threads
        else:
            n_seq = sequences_for(
                found.header,
                n_ctx=inputs.n_ctx,
                workers=inputs.workers,
                budget=inputs.memory_budget,
                cap=SEQS_PER_THREAD * inputs.threads,
            )
        pair = vision_pair(found.path)
        projector = 0 if pair is None else pair[1].stat().st_size * inputs.workers
        return Sizing(n_seq, _bytes(found.header, inputs, n_seq) + projector)


class CTransformersEntry(_GgufEntry):
    name = "ctransformers"
    kinds = frozenset({Kind.TEXT})
    layout = "a GGUF file (llama architectures with scores; by name only)"
    package = "ctransformers"
    module = "engine.backends.ctrans"
    cls = "CTransformersBackend"
    default = False  # only when asked for by name

    def inspect(self, path: str) -> Found:
        header = check_model_file(path, self.name)
        return Found(path, self.name, frozenset({Kind.TEXT}), header)

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        assert found.header is not None
        n_seq = inputs.seqs_cap or 1
        return Sizing(n_seq, _bytes(found.header, inputs, n_seq))


def _bytes(header: GGUFHeader, inputs: SizingInputs, n_seq: int) -> int:
    return estimate_model_bytes(
        header,
        n_ctx=inputs.n_ctx,
        workers=inputs.workers,
        n_batch=inputs.n_batch,
        n_seq=n_seq,
        unified=inputs.kv_unified,
    )
