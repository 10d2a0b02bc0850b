"""The tiny-model writer: deterministic files that the real engines load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.backends import LoadParams
from engine.backends.llamacpp import LlamaCppBackend
from engine.gguf_header import read_gguf_header
from engine.requests import SamplingParams
from engine.tinymodels import CHATML_TEMPLATE, script_tokens, tiny_vocab, write_tiny_llama


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_same_arguments_write_the_same_bytes(tmp_path: Path, dtype: str) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=3, dtype=dtype)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=3, dtype=dtype)
    c = write_tiny_llama(tmp_path / "c.gguf", seed=4, dtype=dtype)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    header = read_gguf_header(a)
    assert header.architecture == "llama"
    assert header.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_script_model_speaks_its_script_in_every_dtype(tmp_path: Path, dtype: str) -> None:
    path = write_tiny_llama(tmp_path / "s.gguf", script="Hi ö你🙂!", dtype=dtype)
    backend = LlamaCppBackend.load(str(path), LoadParams(n_threads=1))
    try:
        backend.start(1, backend.tokenize("anything at all"), SamplingParams(temperature=0))
        out = [backend.step([1])[1] for _ in range(26)]
        backend.finish(1)
        assert backend.detokenize(out).decode() == "Hi ö你🙂!" * 2
    finally:
        backend.free()


def test_byte_fallback_vocab_round_trips_any_text(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "r.gguf")
    backend = LlamaCppBackend.load(str(path), LoadParams(n_threads=1))
    try:
        text = "Grüße, 世界! 🙂 tab\tnewline\n"
        tokens = backend.tokenize(text, add_bos=False)
        assert backend.detokenize(tokens).decode("utf-8").strip() == text.strip()
    finally:
        backend.free()


def test_scripts_with_repeated_tokens_are_refused() -> None:
    tokens, _, _ = tiny_vocab()
    with pytest.raises(ValueError, match="repeats a token"):
        script_tokens("hello", tokens)


def test_command_writes_a_model(tmp_path: Path) -> None:
    out = tmp_path / "cmd.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.tinymodels", str(out), "--dtype", "q8_0", "--script", "Ok!"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(out) in proc.stdout
    assert read_gguf_header(out).architecture == "llama"
