"""Backends used directly: the registry that picks one, chat templates from GGUF metadata,
ctransformers on a tiny GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backends import Kind, LoadParams, available_backends, find_entry
from engine.backends.entry import SizingInputs
from engine.backends.llamacpp import LlamaCppBackend
from engine.backends.onnx_entry import OnnxOptions
from engine.onnx.tinydecoder import write_tiny_decoder
from engine.requests import ChatMessage, SamplingParams
from engine.tinymodels import write_tiny_llama
from protocol.errors import BadRequest, ModelLoadError

from .conftest import SCRIPT


def test_chat_is_rendered_with_the_template_from_the_file(script_model: Path) -> None:
    backend = LlamaCppBackend.load(str(script_model), LoadParams(n_threads=1))
    try:
        prompt = backend.render_chat(
            [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
        )
        assert prompt == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        tokens = backend.tokenize(prompt)
        start, end = backend.tokenize("<|im_start|><|im_end|>", add_bos=False)
        assert tokens.count(start) == 3 and tokens.count(end) == 2  # control tokens parsed
    finally:
        backend.free()


def test_a_model_without_template_gets_a_plain_transcript(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "nt.gguf", chat_template=None)
    backend = LlamaCppBackend.load(str(path), LoadParams(n_threads=1))
    try:
        assert backend.render_chat([ChatMessage("user", "Hi")]) == "user: Hi\nassistant:"
    finally:
        backend.free()


def test_unknown_backend_is_a_bad_request(script_model: Path) -> None:
    with pytest.raises(BadRequest, match="unknown backend"):
        find_entry(str(script_model), "tensorflow")


def _inputs(**kw: object) -> SizingInputs:
    base: dict[str, object] = {
        "n_ctx": 0,
        "workers": 1,
        "threads": 2,
        "seqs_cap": 0,
        "memory_budget": 8 * 2**30,
        "n_batch": 512,
        "kv_unified": False,
        "options": None,
    }
    return SizingInputs(**{**base, **kw})  # type: ignore[arg-type]


def test_the_registry_picks_by_layout_and_each_entry_checks_and_sizes(
    script_model: Path, tmp_path: Path
) -> None:
    """A GGUF file, an ONNX decoder folder and an encoder folder each find their own
    entry, which names the kinds of jobs it serves; a named backend that does not fit
    the path is refused by that backend's own check, with its reason."""
    gguf = find_entry(str(script_model))
    found = gguf.inspect(str(script_model))
    assert (gguf.name, found.kinds) == ("llama_cpp", {Kind.TEXT, Kind.EMBED})
    assert gguf.size(found, _inputs(seqs_cap=3)).n_seq == 3
    chosen = gguf.size(found, _inputs())
    assert 1 <= chosen.n_seq <= 16 and chosen.size > script_model.stat().st_size

    folder = write_tiny_decoder(tmp_path / "dec", seed=0)
    decoder = find_entry(str(folder))
    assert decoder.name == "onnx" and decoder.inspect(str(folder)).kinds == {Kind.TEXT}
    # The decoder's size counts the prefix cache its options keep.
    found = decoder.inspect(str(folder))
    keep = decoder.size(found, _inputs(options=OnnxOptions(prefix_cache_mb=64))).size
    none = decoder.size(found, _inputs(options=OnnxOptions(prefix_cache_mb=0))).size
    assert keep - none == 64 * 2**20
    assert decoder.decode_options(decoder.encode_options(OnnxOptions(spinning=True))) == (
        OnnxOptions(spinning=True)
    )

    (folder / "pooling.json").write_text("{}")
    encoder = find_entry(str(folder))
    assert encoder.cls == "OnnxEncoderBackend"
    assert encoder.inspect(str(folder)).kinds == {Kind.EMBED}

    with pytest.raises(ModelLoadError) as err:
        find_entry(str(script_model), "onnx").inspect(str(script_model))
    assert err.value.reason == "not_onnx"
    with pytest.raises(ModelLoadError) as err:
        find_entry(str(folder), "llama_cpp").inspect(str(folder))
    assert err.value.reason != ""
    assert "llama_cpp" in available_backends() and "onnx" in available_backends()


@pytest.mark.ctransformers
@pytest.mark.skipif(
    "ctransformers" not in available_backends(), reason="ctransformers not installed"
)
def test_ctransformers_speaks_the_script(script_model: Path) -> None:
    entry = find_entry(str(script_model), "ctransformers")
    backend = entry.backend_class().load(str(script_model), LoadParams(n_threads=1))
    try:
        backend.start(
            1, backend.tokenize("hello"), SamplingParams(temperature=0, repeat_penalty=1.0)
        )
        out = [backend.step([1])[1] for _ in range(13)]
        assert backend.detokenize(out).decode() == SCRIPT
        backend.finish(1)
    finally:
        backend.free()


@pytest.mark.ctransformers
@pytest.mark.skipif(
    "ctransformers" not in available_backends(), reason="ctransformers not installed"
)
async def test_ctransformers_serves_through_the_pool(script_model: Path) -> None:
    from engine import EngineClient, EngineConfig, GenerateRequest

    from .conftest import collect

    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        info = await client.load("ct", script_model, backend="ctransformers")
        assert info.backend == "ctransformers"
        sampling = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=26, stop=["🙂!Hi"])
        deltas, done = await collect(
            client, GenerateRequest(model="ct", prompt="x", sampling=sampling)
        )
        assert "".join(d.text for d in deltas) == "Hi ö你"
        assert done.finish_reason == "stop"
