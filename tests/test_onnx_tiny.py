"""The tiny decoder written as ONNX and GGUF: real onnxruntime, real llama.cpp.

The ONNX backend will step several sequences of different lengths in one run
and reuse each sequence's KV cache, so these tests pin down exactly that: the
cache gives the same logits as recomputation, padding (left or right) does not
leak between rows, the native-op graph (opset 23) and the plain-op graph
(opset 17) agree, and llama.cpp on the GGUF twin decodes the same greedy
tokens and tokenizes text the same way.
"""

from __future__ import annotations

import inspect
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from engine.gguf_header import read_gguf_header
from engine.onnx.decoder import TinyDecoderSpec, build_decoder_onnx
from engine.onnx.tinydecoder import SPECIAL_TOKENS, decoder_weights, write_tiny_decoder
from engine.tinymodels import CHATML_TEMPLATE

SPEC = TinyDecoderSpec()
F32 = npt.NDArray[np.float32]
Cache = list[F32]  # past/present tensors in input order: layer 0 key, layer 0 value, ...

PROMPT = "The teacher said that both"  # 9 tokens
BATCH_PROMPTS = ("Thank you for your time and your help.", "Hello, world!")
# Prompts for the llama.cpp comparison; each greedy step below has a top-2
# margin of at least 0.2 with seed 0 (checked in the test).
GREEDY_PROMPTS = ("Hello, world! This is", "In the summer the fields", "The library opened at")
TOKENIZER_TEXTS = (
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "  two  spaces\tand a tab\nnew line\n\n",
    "It's 9:30; don't panic! We'll see, they're here.",
    "naïve café, 1234567 + 89 = ? 🙂",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
)
MIN_MARGIN = 0.01  # below this, the engines' rounding alone could pick different tokens


class Decoder:
    """Feeds the ONNX graph with the Optimum / onnxruntime-genai names."""

    def __init__(self, session: ort.InferenceSession, spec: TinyDecoderSpec = SPEC) -> None:
        self.session = session
        self.spec = spec
        self.past_names = [
            f"past_key_values.{i}.{kind}" for i in range(spec.n_layer) for kind in ("key", "value")
        ]

    def empty_cache(self, batch: int) -> Cache:
        shape = (batch, self.spec.n_kv_head, 0, self.spec.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def run(
        self,
        ids: Sequence[Sequence[int]] | npt.NDArray[np.int64],
        *,
        past: Cache | None = None,
        mask: npt.NDArray[np.int64] | None = None,
        positions: npt.NDArray[np.int64] | None = None,
    ) -> tuple[F32, Cache]:
        input_ids = np.asarray(ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_cache(batch) if past is None else past
        n_past = past[0].shape[2]
        if mask is None:
            mask = np.ones((batch, n_past + seq), np.int64)
        if positions is None:
            positions = np.tile(np.arange(n_past, n_past + seq, dtype=np.int64), (batch, 1))
        feed: dict[str, npt.NDArray[np.generic]] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
        }
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(None, feed)
        return logits, present

    def full(self, ids: Sequence[int]) -> F32:
        """Last-token logits of ``ids`` recomputed from scratch (no cache)."""
        return self.run([list(ids)])[0][0, -1]


def _session(model: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _margin(logits: F32) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("tinydecoder") / "seed0")


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def decoders(folder: Path) -> dict[int, Decoder]:
    """The written native-op graph (opset 23) and plain-op twins built from the same weights."""
    weights = decoder_weights(SPEC, seed=0)
    out = {23: Decoder(_session(str(folder / "model.onnx")))}
    for opset in (17, 22):
        model = build_decoder_onnx(weights, SPEC, opset=opset)
        out[opset] = Decoder(_session(model.SerializeToString()))
    return out


@pytest.fixture(scope="module")
def llama(folder: Path) -> Iterator[llama_cpp.Llama]:
    kwargs: dict[str, int] = {}
    params = inspect.signature(llama_cpp.Llama.__init__).parameters
    if "type_k" in params and "type_v" in params:
        kwargs = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32: no f16 rounding in the cache
    llm = llama_cpp.Llama(
        str(folder / "model.gguf"),
        n_ctx=256,
        logits_all=False,
        n_threads=1,
        verbose=False,
        **kwargs,
    )
    yield llm
    llm.close()


# -- 1. the graph -------------------------------------------------------------


def test_graph_is_valid_and_uses_the_optimum_names(
    folder: Path, decoders: dict[int, Decoder]
) -> None:
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 23)]
    ops = {node.op_type for node in model.graph.node}
    assert {"RMSNormalization", "RotaryEmbedding", "Attention"} <= ops

    session = decoders[23].session
    kv, d = SPEC.n_kv_head, SPEC.head_dim
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"].shape == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"].shape == ["batch_size", "total_sequence_length"]
    assert inputs["position_ids"].shape == ["batch_size", "sequence_length"]
    assert {i.type for i in list(inputs.values())[:3]} == {"tensor(int64)"}
    assert outputs["logits"].shape == ["batch_size", "sequence_length", SPEC.vocab_size]
    assert outputs["logits"].type == "tensor(float)"
    for i in range(SPEC.n_layer):
        for kind in ("key", "value"):
            past = inputs[f"past_key_values.{i}.{kind}"]
            present = outputs[f"present.{i}.{kind}"]
            assert past.shape == ["batch_size", kv, "past_sequence_length", d]
            assert present.shape == ["batch_size", kv, "total_sequence_length", d]
            assert past.type == present.type == "tensor(float)"
    assert len(inputs) == 3 + 2 * SPEC.n_layer
    assert len(outputs) == 1 + 2 * SPEC.n_layer


@pytest.mark.parametrize("opset", [17, 22])
def test_plain_op_graphs_match_the_native_op_graph(
    decoders: dict[int, Decoder], tokenizer: Tokenizer, opset: int
) -> None:
    ids = tokenizer.encode(PROMPT).ids
    native, plain = decoders[23], decoders[opset]
    a, past_a = native.run([ids])
    b, past_b = plain.run([ids])
    assert np.abs(a - b).max() < 1e-4
    for x, y in zip(past_a, past_b, strict=True):
        assert np.abs(x - y).max() < 1e-4
    step_a, _ = native.run([[int(a[0, -1].argmax())]], past=past_a)
    step_b, _ = plain.run([[int(a[0, -1].argmax())]], past=past_b)
    assert np.abs(step_a - step_b).max() < 1e-4


def test_other_opsets_are_refused() -> None:
    weights = decoder_weights(SPEC)
    for opset in (16, 25):
        with pytest.raises(ValueError, match="opset"):
            build_decoder_onnx(weights, SPEC, opset=opset)


# -- 2. the KV cache ----------------------------------------------------------


@pytest.mark.parametrize("opset", [23, 17])
def test_cached_decoding_equals_full_recomputation(
    decoders: dict[int, Decoder], tokenizer: Tokenizer, opset: int
) -> None:
    dec = decoders[opset]
    seq = tokenizer.encode(PROMPT).ids
    assert 8 <= len(seq) <= 14
    logits, past = dec.run([seq])
    assert np.abs(logits[0, -1] - dec.full(seq)).max() < 1e-4
    cached_tokens: list[int] = []
    full_tokens: list[int] = []
    worst = 0.0
    for _ in range(20):
        full = dec.full(seq)
        worst = max(worst, float(np.abs(logits[0, -1] - full).max()))
        cached_tokens.append(int(logits[0, -1].argmax()))
        full_tokens.append(int(full.argmax()))
        seq.append(cached_tokens[-1])
        logits, past = dec.run([[cached_tokens[-1]]], past=past)
        assert past[0].shape[2] == len(seq)
    assert worst < 1e-4
    assert cached_tokens == full_tokens


# -- 3. batching with padding -------------------------------------------------


@pytest.mark.parametrize("opset", [23, 17])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_match_each_row_alone(
    decoders: dict[int, Decoder], tokenizer: Tokenizer, opset: int, side: str
) -> None:
    dec = decoders[opset]
    prompts = [tokenizer.encode(p).ids for p in BATCH_PROMPTS]
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    assert min(lengths) < width
    pad = 0  # <|endoftext|>; any id works, the mask hides it
    ids = np.full((2, width), pad, np.int64)
    mask = np.zeros((2, width), np.int64)
    positions = np.zeros((2, width), np.int64)
    last = []
    for row, p in enumerate(prompts):
        cols = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[row, cols] = p
        mask[row, cols] = 1
        positions[row, cols] = np.arange(len(p))
        last.append(cols.stop - 1)

    logits, past = dec.run(ids, mask=mask, positions=positions)
    for cache in past:
        assert np.isfinite(cache).all()
    alone = [dec.run([p]) for p in prompts]
    for row in range(2):
        assert np.abs(logits[row, last[row]] - alone[row][0][0, -1]).max() < 1e-4

    # A few decode steps: each row appends its own greedy token at its own position.
    alone_logits = [a[0][0, -1] for a in alone]
    alone_past = [a[1] for a in alone]
    rows = [logits[row, last[row]] for row in range(2)]
    for step in range(4):
        nxt = [int(r.argmax()) for r in rows]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = np.array([[n + step] for n in lengths], np.int64)
        logits, past = dec.run([[t] for t in nxt], past=past, mask=mask, positions=pos)
        rows = [logits[row, 0] for row in range(2)]
        for row in range(2):
            assert nxt[row] == int(alone_logits[row].argmax())
            alone_out, alone_past[row] = dec.run([[nxt[row]]], past=alone_past[row])
            alone_logits[row] = alone_out[0, 0]
            assert np.abs(rows[row] - alone_logits[row]).max() < 1e-4, (side, step, row)


# -- 4. llama.cpp on the GGUF twin --------------------------------------------


def test_llama_cpp_tokenizes_like_tokenizer_json(
    llama: llama_cpp.Llama, tokenizer: Tokenizer
) -> None:
    for text in TOKENIZER_TEXTS:
        ours = tokenizer.encode(text).ids
        theirs = llama.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == ours, text
        assert llama.detokenize(theirs, special=True).decode() == text
        assert tokenizer.decode(ours, skip_special_tokens=False) == text
    specials = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert specials == [0, 1, 2]
    assert llama.token_bos() == 0
    assert llama.token_eos() == 2


def test_llama_cpp_decodes_the_same_greedy_tokens(
    llama: llama_cpp.Llama, decoders: dict[int, Decoder], tokenizer: Tokenizer
) -> None:
    dec = decoders[23]
    n_vocab = llama.n_vocab()
    assert n_vocab == SPEC.vocab_size
    for prompt in GREEDY_PROMPTS:
        ids = tokenizer.encode(prompt).ids
        llama.reset()
        llama.eval(ids)
        logits, past = dec.run([ids])
        onnx_tokens: list[int] = []
        llama_tokens: list[int] = []
        for step in range(24):
            ours = logits[0, -1]
            theirs = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,)
            ).copy()
            onnx_tokens.append(int(ours.argmax()))
            llama_tokens.append(int(theirs.argmax()))
            assert onnx_tokens == llama_tokens, f"{prompt!r} diverges at step {step}"
            assert np.abs(ours - theirs).max() < 1e-3, (prompt, step)
            assert _margin(ours) >= MIN_MARGIN, (prompt, step)
            logits, past = dec.run([[onnx_tokens[-1]]], past=past)
            llama.eval([llama_tokens[-1]])
        # llama.cpp's own greedy sampler (temperature 0, no repeat penalty) agrees too.
        sampled = llama.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True)
        assert list(itertools.islice(sampled, 24)) == onnx_tokens, prompt


# -- 5. the files ----------------------------------------------------------------


def test_same_seed_writes_the_same_bytes(folder: Path, tmp_path: Path) -> None:
    again = write_tiny_decoder(tmp_path / "again")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.gguf",
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in names:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    other = write_tiny_decoder(tmp_path / "other", seed=1)
    for name in ("model.onnx", "model.gguf"):
        assert (other / name).read_bytes() != (folder / name).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_command_writes_the_same_bytes_in_a_new_process(folder: Path, tmp_path: Path) -> None:
    # A fresh process gets fresh Rust hash seeds inside tokenizers' BPE trainer.
    out = tmp_path / "cmd"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.onnx.tinydecoder", str(out), "--seed", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "model.onnx" in proc.stdout
    assert proc.stderr == ""
    for name in ("model.onnx", "model.gguf", "tokenizer.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name


def test_hugging_face_files_and_gguf_metadata_describe_the_model(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (SPEC.n_embd, SPEC.n_layer)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["intermediate_size"] == SPEC.n_ff
    assert config["max_position_embeddings"] == SPEC.n_ctx
    assert config["vocab_size"] == SPEC.vocab_size
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 2)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|endoftext|>", "<|im_end|>")
    template = jinja2.Environment().from_string(tok_config["chat_template"])
    text = template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]
    header = read_gguf_header(folder / "model.gguf")
    assert header.architecture == "llama"
    assert header.chat_template == CHATML_TEMPLATE
