"""Constrained decoding over any backend's logits, with llguidance.

A grammar (JSON mode, a JSON Schema, a GBNF grammar, or the tool-call
grammar of :mod:`engine.toolgrammar`) is compiled once per request; each
sequence gets a matcher that, before every sampled token, writes the set of
tokens that keep the output inside the grammar as a bitmask, which is applied
to the logits (disallowed tokens to ``-inf``), so whatever sampler follows can
only pick an allowed token; the picked token is then fed back to the matcher.

Why llguidance: it computes a mask for a 49k-token vocabulary in tens of
microseconds (an earley parser over the token trie rather than a walk over the
vocabulary), works on plain numpy logits (the ONNX backend has no grammar
sampler of its own), supports grammars that start free and switch on at a
trigger (a model that may answer in text *or* call a tool), and its errors
are values, never exceptions thrown through C into the worker.

Everything a request can get wrong (a schema that does not compile, a grammar
that does not parse) is found when the request starts, as a ``BadRequest``.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import llguidance as llg
import numpy as np
import numpy.typing as npt
from llguidance.gbnf_to_lark import any_to_lark

from protocol.errors import BadRequest

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["Guide", "GuideFactory", "closed_objects", "compile_constraint"]

# Whitespace inside JSON is fixed (no free spaces or newlines between tokens): a
# small model allowed free whitespace can fill its whole budget with it.
_INT_BOUND = 10**16 - 1
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists its
    ``properties`` and says nothing about others.

    JSON Schema allows undeclared properties by default; llama.cpp's schema
    grammars do not, and neither do clients asking for a shape (OpenAI's strict
    mode requires it). Both backends follow this rule, so the same schema gives
    the same kind of answer whichever runs the model. Integers without bounds
    get llama.cpp's (16 digits).
    """
    if isinstance(schema, list):
        return [closed_objects(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("type") == "integer":
        # At most 16 digits, as llama.cpp's integers: a small model may otherwise
        # repeat a digit until its token budget runs out.
        out.setdefault("minimum", -_INT_BOUND)
        out.setdefault("maximum", _INT_BOUND)
    return out


def compile_constraint(kind: str, source: str) -> str:
    """The llguidance grammar for a constraint ``(kind, source)`` of :class:`SamplingParams`.

    ``json`` is any JSON object, ``json_schema`` a JSON Schema (as JSON text),
    ``grammar`` a GBNF grammar with a ``root`` rule, ``lark`` llguidance's own
    Lark dialect (what the tool-call grammars are written in).
    """
    try:
        if kind == "json":
            return llg.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=_JSON_OPTIONS
            )
        if kind == "json_schema":
            try:
                schema: Any = json.loads(source)
            except ValueError as exc:
                raise BadRequest(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise BadRequest("the JSON schema must be an object")
            return llg.LLMatcher.grammar_from_json_schema(
                closed_objects(schema), defaults=_JSON_OPTIONS
            )
        if kind == "grammar":
            return llg.LLMatcher.grammar_from_lark(any_to_lark(source))
        if kind == "lark":
            return llg.LLMatcher.grammar_from_lark(source)
    except ValueError as exc:
        raise BadRequest(f"the {kind.replace('_', ' ')} does not compile: {exc}") from None
    raise BadRequest(f"unknown constraint kind {kind!r}")


class Guide:
    """One sequence's matcher: masks its logits before each token, then takes the token."""

    __slots__ = ("_bits", "_mask", "_matcher", "_n_vocab")

    def __init__(self, matcher: llg.LLMatcher, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._mask = np.full(((n_vocab + 31) // 32,), -1, dtype=np.int32)
        self._bits = np.zeros(self._mask.size * 32, dtype=np.bool_)

    def mask(self, logits: npt.NDArray[np.float32]) -> bool:
        """Set every token the grammar forbids next to ``-inf`` in ``logits`` (in place).

        False when no token is allowed (the grammar is in an error state, or
        allows only what the vocabulary cannot spell): the sequence must end.
        """
        m = self._matcher
        if m.is_error():
            return False
        m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little").view(np.bool_)
        n = min(logits.shape[0], allowed.shape[0])
        np.logical_not(allowed[:n], out=self._bits[:n])
        logits[:n][self._bits[:n]] = -np.inf
        if logits.shape[0] > n:
            logits[n:] = -np.inf
        return bool(allowed[:n].any())

    def accept(self, token: int) -> bool:
        """Advance over the sampled ``token``; False if the grammar did not allow it."""
        return bool(self._matcher.consume_token(token))

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more: only the end of generation."""
        return bool(self._matcher.is_stopped())

    def error(self) -> str:
        return str(self._matcher.get_error())


class GuideFactory:
    """The grammar engine's view of one model's vocabulary; makes a :class:`Guide` per sequence.

    Building the tokenizer costs ~0.3 s (every token's bytes), so it is made
    on first use and kept with the loaded model. Compiled grammars are cached
    by text: requests with the same schema or tools share one.
    """

    _CACHE = 32

    def __init__(self, tokenizer: llg.LLTokenizer, n_vocab: int) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._compiled: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def grammar(self, kind: str, source: str) -> str:
        """Compile and check ``(kind, source)`` against this vocabulary (cached)."""
        key = (kind, source)
        with self._lock:
            cached = self._compiled.get(key)
        if cached is not None:
            return cached
        grammar = compile_constraint(kind, source)
        error = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise BadRequest(f"the {kind.replace('_', ' ')} is not usable: {error}")
        with self._lock:
            if len(self._compiled) >= self._CACHE:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = grammar
        return grammar

    def guide(self, kind: str, source: str) -> Guide:
        matcher = llg.LLMatcher(self.tokenizer, self.grammar(kind, source))
        if matcher.is_error():
            raise BadRequest(f"the {kind.replace('_', ' ')} is not usable: {matcher.get_error()}")
        return Guide(matcher, self.n_vocab)

    @classmethod
    def from_tokenizer_json(
        cls, text: str, n_vocab: int, eos: int | list[int] | None = None
    ) -> GuideFactory:
        """For models with a Hugging Face ``tokenizer.json`` (the ONNX backend)."""
        return cls(llg.LLTokenizer(text, eos_token=eos), n_vocab)

    @classmethod
    def from_llama_vocab(cls, vocab: object, n_vocab: int) -> GuideFactory:
        """For a llama.cpp model: each token's bytes, control tokens marked as special.

        llguidance tells special tokens by a leading 0xFF byte (no text spells
        them); tokenizing goes through llama.cpp's own tokenizer.
        """
        import ctypes

        import llama_cpp

        buf = ctypes.create_string_buffer(1024)
        tokens: list[bytes] = []
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        user = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        for token in range(n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            piece = buf.raw[: max(n, 0)]
            attr = int(llama_cpp.llama_vocab_get_attr(vocab, token))
            if attr & control or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + piece
            tokens.append(piece)
        tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        tokenizer = llg.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
            tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=eos, slices=None
        )
        return cls(tokenizer, n_vocab)
