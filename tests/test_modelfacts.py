"""What models say they are, read from their own files (engine.modelfacts)."""

from __future__ import annotations

from pathlib import Path

from engine.gguf_header import read_gguf_header
from engine.modelfacts import facts_of, size_label
from engine.onnx.tinydecoder import write_tiny_decoder
from engine.tinybert import write_tiny_bert


def test_size_labels() -> None:
    assert [size_label(n) for n in (134_515_008, 1_711_376_384, 22_700_000, 950)] == [
        "135M",
        "1.7B",
        "23M",
        "950",
    ]


def test_smollm2_gguf(smollm2: Path) -> None:
    f = facts_of(smollm2)
    assert (f.format, f.architecture, f.family) == ("gguf", "llama", "llama")
    assert f.parameter_size == "135M" and 130e6 < f.parameter_count < 140e6
    assert f.quantization == "Q4_1"
    assert (f.context_length, f.embedding_length) == (8192, 576)
    assert f.capabilities == ("completion",)


def test_a_written_gguf_counts_every_tensor(eos_model: Path) -> None:
    f = facts_of(eos_model)
    assert f.parameter_count == read_gguf_header(eos_model).n_params > 0
    assert f.quantization == "F32" and f.architecture == "llama"


def test_onnx_decoders_complete_and_encoders_embed(tmp_path: Path) -> None:
    decoder = facts_of(write_tiny_decoder(tmp_path / "dec", seed=0))
    assert decoder.format == "onnx" and decoder.capabilities == ("completion",)
    assert decoder.parameter_count > 0 and decoder.quantization == "F32"
    encoder = facts_of(write_tiny_bert(tmp_path / "enc"))
    assert encoder.capabilities == ("embedding",) and encoder.architecture == "bert"
    assert encoder.embedding_length > 0
