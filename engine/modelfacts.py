"""What a model is, read from its own files: family, size, quantization, context, capabilities.

Clients decide from these (Ollama's ``/api/show`` ``details`` and
``capabilities``, a chat page picking a chat model, an operator comparing
quantizations), so they come from the model's metadata, never from its name:

* **GGUF**: ``general.architecture`` (the family, as Ollama reports it),
  the parameter count summed over the tensor table (``general.size_label``
  when the file gives one), ``general.file_type`` for the quantization,
  ``{arch}.context_length`` and ``{arch}.embedding_length``; an encoder
  architecture (BERT and its kin) embeds, any other completes, and a chat
  template that renders ``tools`` adds tool use.
* **sentence-transformers** folders (``config.json`` and safetensors): an
  encoder, which embeds; the parameter count from the safetensors headers.
* **ONNX** folders: ``config.json`` (``model_type``, ``hidden_size``,
  ``max_position_embeddings``), the graph's initializers for the parameter
  count (a 4-bit ``MatMulNBits`` weight counts its ``K x N`` values, not its
  packed bytes) and the quantization; a folder with an image preprocessor
  config classifies images, one with a text and a vision graph (CLIP) embeds
  both, one with ``diffusion.json`` generates images; a graph without a key/value cache is an encoder, which embeds.

Reading a GGUF header takes milliseconds, an ONNX graph without its weights
a little more; callers cache by content (a store blob never changes).
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

import gguf
import msgspec

from engine.gguf_header import read_gguf_header

__all__ = ["ENCODER_ARCHITECTURES", "ModelFacts", "facts_of", "size_label"]

# GGUF architectures that embed rather than generate.
ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder"}
)


class ModelFacts(msgspec.Struct, frozen=True, omit_defaults=True):
    format: str  # "gguf", "onnx", "whisper", "hibari"
    architecture: str = ""
    family: str = ""
    parameter_count: int = 0
    parameter_size: str = ""  # "135M", "1.7B"
    quantization: str = ""  # "Q4_1", "F16", "Q4 (MatMulNBits)"
    context_length: int = 0
    embedding_length: int = 0
    capabilities: tuple[str, ...] = ()


def kind_of(facts: ModelFacts | None) -> str:
    """The kind of jobs a model serves, as ``list`` and ``show`` name it: ``text``,
    ``embed``, ``asr`` (speech recognition), ``tts`` (speech synthesis), ``vad``
    (voice activity, for WebSocket voice), ``image-classify``, ``image-embed`` or
    ``image-generate``."""
    caps = set(facts.capabilities) if facts is not None else set()
    if "classification" in caps:
        return "image-classify"
    if "image-embedding" in caps:
        return "image-embed"
    if "image-generation" in caps:
        return "image-generate"
    if "transcription" in caps:
        return "asr"
    if "speech" in caps:
        return "tts"
    if "vad" in caps:
        return "vad"
    if caps and caps <= {"embedding"}:
        return "embed"
    return "text"


def size_label(n: int) -> str:
    """``135M``, ``1.7B``: a parameter count as model names spell it."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return (
                f"{value:.0f}{unit}"
                if value >= 10
                else f"{value:.1f}".rstrip("0").rstrip(".") + unit
            )
    return str(n)


def facts_of(path: str | os.PathLike[str]) -> ModelFacts:
    """The facts of a GGUF file or an ONNX model folder (ModelLoadError when unreadable)."""
    p = Path(path)
    if p.is_dir():
        if (p / "silero_vad.onnx").is_file():
            return ModelFacts(
                format="vad", architecture="silero", family="silero", capabilities=("vad",)
            )
        if (p / "voice.json").is_file():
            return _voice_facts(p)
        if (p / "model.bin").is_file():
            return _whisper_facts(p)
        from engine.backends.image_entry import clip_graphs

        graphs = clip_graphs(p)
        if graphs is not None:
            return _clip_facts(p, graphs)
        if (p / "diffusion.json").is_file():
            return _diffusion_facts(p)
        from engine.backends.gguf_entry import vision_pair

        pair = vision_pair(p)
        if pair is not None:  # a GGUF model with its projector: it reads images too
            facts = facts_of(pair[0])
            return msgspec.structs.replace(
                facts, capabilities=(*facts.capabilities, "vision"), format="gguf"
            )
        if not (p / "model.onnx").is_file():
            return _safetensors_facts(p)
        return _onnx_facts(p)
    return _gguf_facts(p)


def _whisper_facts(folder: Path) -> ModelFacts:
    """A Whisper folder in CTranslate2's layout: speech recognition, and translation for a
    multilingual model (whose vocabulary has 51865 tokens or more; English-only: 51864)."""
    try:
        with open(folder / "vocabulary.txt", "rb") as f:
            vocab = sum(1 for _ in f)
    except OSError:
        vocab = 0
    multilingual = vocab >= 51865
    return ModelFacts(
        format="whisper",
        architecture="whisper",
        family="whisper",
        capabilities=("transcription", "translation") if multilingual else ("transcription",),
    )


def _voice_facts(folder: Path) -> ModelFacts:
    """A hibari voice folder: speech synthesis."""
    return ModelFacts(
        format="hibari", architecture="hibari", family="hibari", capabilities=("speech",)
    )


def _gguf_facts(path: Path) -> ModelFacts:
    header = read_gguf_header(path)
    arch = header.architecture
    meta = header.metadata
    ftype = meta.get("general.file_type")
    quant = ""
    if isinstance(ftype, int):
        try:
            name = gguf.LlamaFileType(ftype).name
        except ValueError:
            name = ""
        quant = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    labelled = meta.get("general.size_label")
    count = header.n_params
    template = header.chat_template or ""
    if arch in ENCODER_ARCHITECTURES:
        capabilities: tuple[str, ...] = ("embedding",)
    else:
        capabilities = ("completion", "tools") if "tools" in template else ("completion",)
    return ModelFacts(
        format="gguf",
        architecture=arch,
        family=arch,
        parameter_count=count,
        parameter_size=labelled if isinstance(labelled, str) and labelled else size_label(count),
        quantization=quant,
        context_length=header.context_length,
        embedding_length=header.get_int(f"{arch}.embedding_length"),
        capabilities=capabilities,
    )


def _onnx_facts(folder: Path) -> ModelFacts:
    import onnx  # only for ONNX folders: a large import

    config = _config(folder)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: _count(t.dims) for t in graph.initializer}
    dtypes = Counter[int]()
    for t in graph.initializer:
        dtypes[t.data_type] += sizes[t.name]
    packed: set[str] = set()
    count = 0
    nbits = False
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            nbits = True
            attrs = {a.name: a.i for a in node.attribute}
            count += attrs.get("K", 0) * attrs.get("N", 0)
            packed.update(node.input[1:])  # the packed weight, scales, zero points
    count += sum(n for name, n in sizes.items() if name not in packed)
    encoder = not any("past_key_values" in i.name or i.name.startswith("past") for i in graph.input)
    if (folder / "preprocessor_config.json").is_file():
        caps: tuple[str, ...] = ("classification",)  # images in, a score per label out
    else:
        caps = ("embedding",) if encoder else ("completion",)
    if nbits:
        quant = "Q4 (MatMulNBits)"
    elif dtypes:
        quant = onnx.helper.tensor_dtype_to_string(dtypes.most_common(1)[0][0]).removeprefix(
            "TensorProto."
        )
        quant = {"FLOAT": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16"}.get(quant, quant)
    else:
        quant = ""
    return _from_config("onnx", config, count, quant, caps)


def _clip_facts(folder: Path, graphs: tuple[Path, Path]) -> ModelFacts:
    """A CLIP-style pair of graphs: texts and images embedded into one space."""
    import onnx

    count = sum(
        _count(t.dims)
        for g in graphs
        for t in onnx.load(str(g), load_external_data=False).graph.initializer
    )
    config = _config(folder)
    facts = _from_config("onnx", config, count, "", ("embedding", "image-embedding"))
    text = config.get("text_config")
    context = _int(text.get("max_position_embeddings")) if isinstance(text, dict) else 0
    return msgspec.structs.replace(
        facts,
        context_length=context or 77,
        embedding_length=_int(config.get("projection_dim")),
    )


def _diffusion_facts(folder: Path) -> ModelFacts:
    """An image generator: every graph's parameters; text-conditioned or not."""
    import onnx

    count = sum(
        _count(t.dims)
        for g in sorted(folder.glob("*.onnx"))
        for t in onnx.load(str(g), load_external_data=False).graph.initializer
    )
    return ModelFacts(
        format="onnx",
        architecture="diffusion",
        family="diffusion",
        parameter_count=count,
        parameter_size=size_label(count) if count else "",
        capabilities=("image-generation",),
    )


def _config(folder: Path) -> dict[str, object]:
    try:
        loaded = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _safetensors_facts(folder: Path) -> ModelFacts:
    """A sentence-transformers folder (``config.json`` + ``model.safetensors``): an encoder."""
    config = _config(folder)
    count = 0
    dtypes = Counter[str]()
    for file in folder.glob("*.safetensors"):
        try:
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(min(size, 1 << 26)))
        except (OSError, ValueError, struct.error):
            continue
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                n = _count(entry.get("shape", ()))
                count += n
                dtypes[str(entry.get("dtype", ""))] += n
    quant = dtypes.most_common(1)[0][0] if dtypes else ""
    return _from_config("safetensors", config, count, quant, ("embedding",))


def _from_config(
    fmt: str, config: dict[str, object], count: int, quant: str, capabilities: tuple[str, ...]
) -> ModelFacts:
    """Facts of a folder model: its Hugging Face ``config.json`` says the rest."""
    arch = str(config.get("model_type") or "")
    return ModelFacts(
        format=fmt,
        architecture=arch,
        family=arch,
        parameter_count=count,
        parameter_size=size_label(count) if count else "",
        quantization=quant,
        context_length=_int(config.get("max_position_embeddings")),
        embedding_length=_int(config.get("hidden_size")),
        capabilities=capabilities,
    )


def _count(dims: object) -> int:
    n = 1
    for d in dims:  # type: ignore[attr-defined]
        n *= int(d)
    return n


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0
