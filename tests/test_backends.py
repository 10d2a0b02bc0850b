"""Backends used directly: chat templates from GGUF metadata, ctransformers on a tiny GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backends import LoadParams, available_backends, backend_class, choose_backend
from engine.backends.llamacpp import LlamaCppBackend
from engine.requests import ChatMessage, SamplingParams
from engine.tinymodels import write_tiny_llama
from protocol.errors import BadRequest

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
        choose_backend(str(script_model), "tensorflow")


@pytest.mark.ctransformers
@pytest.mark.skipif(
    "ctransformers" not in available_backends(), reason="ctransformers not installed"
)
def test_ctransformers_speaks_the_script(script_model: Path) -> None:
    backend = backend_class("ctransformers").load(str(script_model), LoadParams(n_threads=1))
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
