"""GGUF → ONNX conversion: the tiny twin round-trips exactly; SmolLM2 matches llama.cpp.

The tiny decoder folder holds an ONNX graph and the GGUF written from the
same weights, so converting the GGUF back must give the same logits (to
rounding) and a tokenizer that splits text the same way. SmolLM2's Q4_1
weights are dequantized to float32, while llama.cpp multiplies quantized
weights by quantized activations, so greedy decoding may part where the top
two logits nearly tie; the test checks that it only parts there.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from engine import ChatMessage, EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.chat import render_chat
from engine.onnx import tinydecoder
from engine.onnx.convert import convert_gguf, main
from engine.onnx.decoder import TinyDecoderSpec
from engine.onnx.tinydecoder import decoder_weights, write_tiny_decoder
from protocol.errors import ModelLoadError

from .conftest import SmolLM2Onnx, collect

PROMPTS = ["The quick brown fox", "Once upon a time there", "Hello, world! What is 4,500?"]
TEXTS = [
    "Hello, world! This is a test.",
    "Café déjà vu — naïve 你好 🙂",
    "<|im_start|>user\nDon't forget at 9:30<|im_end|>\n<|im_start|>assistant\n",
    "  spaces\tand\nnewlines 3.14159 it's 12345",
    "<|endoftext|>",
]


def session(folder: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), opts)


def logits(sess: ort.InferenceSession, ids: Sequence[int]) -> npt.NDArray[np.float32]:
    """Logits [len(ids), vocab] of one prompt read from an empty cache."""
    feeds: dict[str, Any] = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            kv_heads, head_dim = inp.shape[1], inp.shape[3]
            feeds[inp.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
    out = sess.run(["logits"], feeds)[0]
    return np.asarray(out[0], dtype=np.float32)


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# ---------------------------------------------------------------------------
# The tiny twin (fast)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("convert") / "tiny", seed=3)


@pytest.fixture(scope="module")
def converted(tiny: Path) -> Path:
    return convert_gguf(tiny / "model.gguf", tiny.parent / "converted")


def test_tiny_round_trip_gives_the_same_logits(tiny: Path, converted: Path) -> None:
    assert (converted / "model.onnx.data").stat().st_size > 700_000  # weights are external
    assert (converted / "model.onnx").stat().st_size < 100_000
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no staging
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    original, back = session(tiny), session(converted)
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        a, b = logits(original, ids), logits(back, ids)
        assert np.abs(a - b).max() < 1e-4, prompt
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_tiny_round_trip_plain_op_graph(tiny: Path, tmp_path: Path) -> None:
    """opset 17 (plain ops, explicit rope) from the GGUF equals the native graph."""
    plain = convert_gguf(tiny / "model.gguf", tmp_path / "plain", opset=17)
    ids = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(PROMPTS[0]).ids
    diff = np.abs(logits(session(tiny), ids) - logits(session(plain), ids)).max()
    assert diff < 1e-4


def test_tiny_round_trip_tokenizer_and_configs(tiny: Path, converted: Path) -> None:
    a = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    b = Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert b.get_vocab_size() == a.get_vocab_size()
    for text in TEXTS + PROMPTS:
        ids = a.encode(text, add_special_tokens=False).ids
        assert b.encode(text, add_special_tokens=False).ids == ids, text
        assert b.decode(ids, skip_special_tokens=False) == a.decode(ids, skip_special_tokens=False)
    special = {t.content for t in b.get_added_tokens_decoder().values() if t.special}
    assert special == set(tinydecoder.SPECIAL_TOKENS)

    config = read_json(converted / "config.json")
    assert config == read_json(tiny / "config.json")  # every key, values included
    assert read_json(converted / "generation_config.json") == read_json(
        tiny / "generation_config.json"
    )
    tc, tc0 = (
        read_json(converted / "tokenizer_config.json"),
        read_json(tiny / "tokenizer_config.json"),
    )
    for key in ("chat_template", "add_bos_token", "bos_token", "eos_token", "pad_token"):
        assert tc[key] == tc0[key], key
    assert tc["added_tokens_decoder"] == tc0["added_tokens_decoder"]


def test_convert_refuses_what_it_cannot_express(tiny: Path, tmp_path: Path) -> None:
    import gguf

    other = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(other), arch="bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(other, tmp_path / "out1")
    assert e.value.reason == "unsupported_architecture" and str(other) in e.value.message

    # A tensor type nothing can dequantize (F64) in an otherwise valid llama file.
    spec = TinyDecoderSpec()
    weights: dict[str, Any] = decoder_weights(spec, seed=1)
    weights["blk.1.ffn_up.weight"] = weights["blk.1.ffn_up.weight"].astype(np.float64)
    tok = tinydecoder.train_tiny_tokenizer(spec.vocab_size)
    tokens, merges = tinydecoder._vocab_and_merges(tok)
    f64 = tmp_path / "f64.gguf"
    tinydecoder._write_gguf(f64, weights, spec, tokens, merges, "f64")
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(f64, tmp_path / "out2")
    assert e.value.reason == "unsupported_tensor_type" and "F64" in e.value.detail

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all, just text" * 4)
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(junk, tmp_path / "out3")
    assert e.value.reason == "not_gguf"
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out4")
    assert e.value.reason == "missing"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", "."))]


def test_convert_replaces_only_when_asked(tiny: Path, tmp_path: Path) -> None:
    dst = tmp_path / "m"
    dst.mkdir()  # an empty folder is fine
    convert_gguf(tiny / "model.gguf", dst)
    with pytest.raises(FileExistsError):
        convert_gguf(tiny / "model.gguf", dst)
    (dst / "extra.txt").write_text("old")
    convert_gguf(tiny / "model.gguf", dst, overwrite=True)
    assert not (dst / "extra.txt").exists() and (dst / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny / "model.gguf"), str(tmp_path / "cli")]) == 0
    assert "model.onnx.data" in capsys.readouterr().out
    assert main([str(tiny / "model.onnx"), str(tmp_path / "cli2")]) == 1
    assert "not_gguf" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1)

QUESTION = "What is the capital of France? Answer in one sentence."
CHATS = [QUESTION, "Name three primary colors.", "Write one sentence about the sea."]
MARGIN = 0.5


@pytest.fixture(scope="module")
def smol_onnx(smollm2_onnx: SmolLM2Onnx) -> Path:
    """The float32 graph: only float weights can be held to llama.cpp's picks up to near-ties."""
    return smollm2_onnx("f32")


@pytest.fixture
async def smol_pool(smollm2: Path, smol_onnx: Path) -> AsyncIterator[EngineClient]:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("smol-onnx", smol_onnx)
        await client.load("smol-gguf", smollm2)
        yield client


@pytest.mark.smollm2
def test_smollm2_tokenizer_matches_llama_cpp(smollm2: Path, smol_onnx: Path) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(str(smollm2), vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(str(smol_onnx / "tokenizer.json"))
    for text in TEXTS:
        want = vocab.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.encode(text, add_special_tokens=False).ids == want, text
    config = read_json(smol_onnx / "config.json")
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert config["max_position_embeddings"] == 8192 and config["tie_word_embeddings"]
    eos = read_json(smol_onnx / "generation_config.json")["eos_token_id"]
    assert tok.token_to_id("<|im_end|>") in eos


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=n)


@pytest.mark.smollm2
async def test_smollm2_onnx_answers_and_agrees_with_llama_cpp(
    smol_pool: EngineClient, smol_onnx: Path
) -> None:
    tok = Tokenizer.from_file(str(smol_onnx / "tokenizer.json"))
    template = read_json(smol_onnx / "tokenizer_config.json")["chat_template"]
    sess: ort.InferenceSession | None = None
    for n, question in enumerate(CHATS):
        messages = [ChatMessage("user", question)]
        runs: dict[str, tuple[list[int], str]] = {}
        for model in ("smol-onnx", "smol-gguf"):
            request = GenerateRequest(
                model=model, messages=messages, sampling=greedy(32), token_ids=True
            )
            deltas, done = await collect(smol_pool, request)
            assert done.error is None, done.error
            runs[model] = (
                [i for d in deltas for i in d.token_ids or []],
                "".join(d.text for d in deltas),
            )
            if model == "smol-onnx" and n == 0:
                print(f"\nONNX f32 decode: {done.timings.decode_tok_s:.1f} tok/s (pool, 1 stream)")
                prompt = tok.encode(render_chat(template, messages), add_special_tokens=False).ids
                assert done.usage.prompt_tokens == len(prompt)
        (a, a_text), (b, b_text) = runs["smol-onnx"], runs["smol-gguf"]
        if n == 0:
            assert "Paris" in a_text, a_text
        if a == b:
            print(f"{question!r}: {len(a)} greedy tokens identical")
            continue
        k = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        prompt = tok.encode(render_chat(template, messages), add_special_tokens=False).ids
        sess = sess or session(smol_onnx)
        row = logits(sess, prompt + a[:k])[-1]
        second, first = np.argsort(row)[-2:]
        margin = float(row[first] - row[second])
        if k < min(len(a), len(b)):
            assert {a[k], b[k]} == {int(first), int(second)}  # the two engines' picks tie
        print(
            f"{question!r}: diverge at token {k} (onnx {a[k : k + 1]}, llama.cpp {b[k : k + 1]}), "
            f"ONNX top-2 margin {margin:.3f}"
        )
        assert margin < MARGIN, (question, k, margin, a_text, b_text)
