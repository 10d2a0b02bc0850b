"""llama.cpp's samplers for one model's vocabulary: chains, grammars, checked draws.

Greedy requests skip all of this (the backend takes an argmax with numpy); the
rest get a llama.cpp sampler chain per sequence (penalties, top-k, top-p,
min-p, temperature, seeded draw). A GBNF grammar (given, converted from a JSON
Schema, or the JSON-object grammar) is parsed once, cached, and cloned first
into a sequence's chain, so it masks every token that cannot continue it before
anything else looks at the logits. Grammars are checked first for what would
crash llama.cpp's recursive parser (very deep nesting, huge texts), and a chain
with a grammar is sampled with the documented pieces rather than
``llama_sampler_sample``, which aborts the process when the grammar allows no
token. llguidance grammars (tool calls) are made here too, on first use.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

import llama_cpp
import llama_cpp.llama_grammar
import numpy as np

from engine.guidance import GuideFactory
from engine.requests import SamplingParams
from protocol.errors import BadRequest

__all__ = ["PENALTY_LAST_N", "Samplers", "capturing_errors", "log_callback"]

PENALTY_LAST_N = 64

# llama.cpp parses grammars recursively on the worker's main thread: about
# 20,000 nested groups or 100,000 chained rules overflow its stack and kill the
# process (measured), so refuse far below that. 1,000 still allows a JSON
# Schema string with maxLength 1,000 (one group per optional character).
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_DEPTH = 1000
GRAMMAR_CACHE = 16  # parsed grammars kept per model (a new sequence clones one)

# Strings, character classes and comments of GBNF: brackets inside them do not nest.
_GBNF_OPAQUE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*')

# struct llama_token_data {llama_token id; float logit; float p;}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)

_log_sink: list[str] | None = None  # collects llama.cpp errors while a grammar is parsed


def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs to stderr by default; workers keep stderr for their own records.

    While a grammar is being parsed its messages are kept (llama.cpp logs only
    its errors then), so that the request's error can say what is wrong.
    """
    if _log_sink is not None:
        _log_sink.append(text.decode("utf-8", errors="replace"))


log_callback = llama_cpp.llama_log_callback(_quiet_log)


def _grammar_depth(gbnf: str) -> int:
    """How deeply ``( ... )`` groups nest in a GBNF text (outside strings and classes)."""
    depth = deepest = 0
    for match in re.finditer(r"[()]", _GBNF_OPAQUE.sub("", gbnf)):
        depth += 1 if match.group() == "(" else -1
        deepest = max(deepest, depth)
    return deepest


def capturing_errors(
    fn: Callable[[], object], keep: Callable[[str], object] | None = None
) -> tuple[object, str]:
    """Call ``fn`` and return its result with what llama.cpp reported meanwhile
    (only the lines ``keep`` accepts, when given).

    The grammar parser prints its syntax errors straight to stderr (not through
    the log callback), so fd 2 is pointed at a temporary file for the call. The
    worker is single-threaded, so nothing else writes to stderr meanwhile.
    """
    global _log_sink
    sink: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        _log_sink = sink
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                result = fn()
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            _log_sink = None
        tmp.seek(0)
        printed = tmp.read(8192).decode("utf-8", errors="replace")
    marker = "error parsing grammar: "
    reasons = [line.split(marker, 1)[1].strip() for line in printed.splitlines() if marker in line]
    reasons += [line.strip() for line in "".join(sink).splitlines() if line.strip()]
    if keep is not None:
        reasons = [line for line in reasons if keep(line)]
    return result, "; ".join(dict.fromkeys(reasons))[:500]


class Samplers:
    """The sampler chains and parsed grammars of one model's vocabulary (see the module)."""

    def __init__(self, vocab: object, n_vocab: int) -> None:
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA)  # for sample_checked
        self._one_candidate = np.zeros(1, dtype=_TOKEN_DATA)  # for greedy_grammar
        self._token_ids = np.arange(n_vocab, dtype=np.int32)
        self._grammars: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._guides: GuideFactory | None = None  # made on the first tool call
        self._eog: np.ndarray | None = None  # end-of-generation tokens, found on first use

    def end_tokens(self) -> np.ndarray:
        """The vocabulary's end-of-generation tokens (``ignore_eos`` bans them)."""
        if self._eog is None:
            is_eog = llama_cpp.llama_vocab_is_eog
            self._eog = np.array(
                [t for t in range(self._n_vocab) if is_eog(self._vocab, t)], dtype=np.intp
            )
        return self._eog

    def check(self, sampling: SamplingParams) -> None:
        """Refuse a constraint that does not parse (BadRequest), before anything runs."""
        constraint = sampling.constraint()
        if constraint is None:
            return
        if constraint[0] == "lark":
            self.guides().grammar(*constraint)
        else:
            self.grammar(*constraint)

    def guides(self) -> GuideFactory:
        """llguidance's view of this vocabulary, built on first use (~0.3 s)."""
        if self._guides is None:
            self._guides = GuideFactory.from_llama_vocab(self._vocab, self._n_vocab)
        return self._guides

    def grammar(self, kind: str, source: str) -> object:
        """The parsed grammar sampler for a constraint (cached; callers clone it)."""
        key = (kind, source)
        cached = self._grammars.get(key)
        if cached is not None:
            self._grammars.move_to_end(key)
            return cached
        if kind == "json":
            gbnf = llama_cpp.llama_grammar.JSON_GBNF  # root ::= object, as Ollama's format "json"
        elif kind == "json_schema":
            gbnf = self._schema_grammar(source)
        else:
            gbnf = source
            if not gbnf.strip():
                raise BadRequest("the grammar is empty")
        what = "the grammar" if kind == "grammar" else "the grammar of the JSON schema"
        data = gbnf.encode("utf-8")
        if len(data) > MAX_GRAMMAR_BYTES:
            raise BadRequest(
                f"{what} has {len(data)} bytes; the limit is {MAX_GRAMMAR_BYTES}"
                + (" (lower maxLength/maxItems)" if kind == "json_schema" else "")
            )
        depth = _grammar_depth(gbnf)
        if depth > MAX_GRAMMAR_DEPTH:
            raise BadRequest(
                f"{what} nests groups {depth} deep; the limit is {MAX_GRAMMAR_DEPTH}"
                + (" (lower maxLength/maxItems)" if kind == "json_schema" else "")
            )
        vocab = self._vocab
        sampler, why = capturing_errors(
            lambda: llama_cpp.llama_sampler_init_grammar(vocab, data, b"root")
        )
        if not sampler:
            raise BadRequest(f"invalid {kind.replace('_', ' ')}: {why or 'llama.cpp rejected it'}")
        self._grammars[key] = sampler
        if len(self._grammars) > GRAMMAR_CACHE:
            _, old = self._grammars.popitem(last=False)
            llama_cpp.llama_sampler_free(old)
        return sampler

    @staticmethod
    def _schema_grammar(source: str) -> str:
        try:
            schema = json.loads(source)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise BadRequest("json_schema must be a JSON object")
        try:
            return str(llama_cpp.llama_grammar.json_schema_to_gbnf(source))
        except Exception as exc:  # the converter asserts on what it does not support
            raise BadRequest(
                f"invalid or unsupported JSON schema: {exc or type(exc).__name__}"
            ) from None

    def chain(self, s: SamplingParams, prompt: list[int]) -> object | None:
        """The llama.cpp sampler for ``s`` (``prompt`` primes its repeat penalty), or
        None for the greedy fast path the backend runs with numpy."""
        constraint = s.constraint()
        if constraint is not None and constraint[0] == "lark":
            constraint = None  # applied as a mask on the logits (see step), not a sampler
        if constraint is None and s.temperature == 0.0:
            return None  # numpy argmax (with the repeat penalty applied there)
        grammar = None if constraint is None else self.grammar(*constraint)
        if grammar is not None and s.temperature == 0.0 and s.repeat_penalty == 1.0:
            return cast(object, llama_cpp.llama_sampler_clone(grammar))
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if grammar is not None:
            # First: every later sampler sees only tokens the grammar allows.
            add(chain, llama_cpp.llama_sampler_clone(grammar))
        elif s.ignore_eos and len(self.end_tokens()):
            # As llama.cpp's own ignore_eos: the end tokens are never drawn, so the text
            # goes on rather than opening turns of a conversation nobody asked for.
            ends = self.end_tokens()
            bias = (llama_cpp.llama_logit_bias * len(ends))(
                *(llama_cpp.llama_logit_bias(int(t), -math.inf) for t in ends)
            )
            add(chain, llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(ends), bias))
        if s.repeat_penalty != 1.0:
            penalties = llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, PENALTY_LAST_N, s.repeat_penalty, 0.0, 0.0
            )
            add(chain, penalties)
            # The prompt counts for the penalty, but must not reach the grammar
            # (it would reject the prompt's tokens), so only this sampler sees it.
            for tok in [t for t in prompt[-PENALTY_LAST_N:] if t < self._n_vocab]:
                llama_cpp.llama_sampler_accept(penalties, tok)
        if s.temperature == 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0.0:
                add(chain, llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return cast(object, chain)

    def sample_checked(self, chain: object, logits: np.ndarray) -> int | None:
        """Sample through a grammar chain; None when the grammar allows no token at all.

        ``llama_sampler_sample`` would pick a token anyway (every logit masked to
        -inf) and its grammar ``accept`` then throws a C++ exception that
        terminates the worker. So this does the same steps with the documented
        pieces (apply the chain to all candidates, check the pick, accept it).
        """
        arr = self._apply_to_vocab(chain, logits)
        if not 0 <= arr.selected < arr.size:
            return None
        chosen = arr.data[arr.selected]
        if not math.isfinite(chosen.logit):
            return None
        token = int(chosen.id)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _apply_to_vocab(
        self, chain: object, logits: np.ndarray
    ) -> llama_cpp.llama_token_data_array:
        """Run ``chain`` over every token of the vocabulary (in ``self._candidates``)."""
        cand = self._candidates
        cand["id"] = self._token_ids
        cand["logit"] = logits
        cand["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            cand.ctypes.data_as(llama_cpp.llama_token_data_p), self._n_vocab, -1, False
        )
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        return arr

    def greedy_grammar(self, grammar: object, logits: np.ndarray) -> int | None:
        """Greedy decoding under a grammar, checking the argmax before masking the vocabulary.

        Masking all 49k tokens through the grammar costs ~10 ms a token (it
        halves SmolLM2's speed); the argmax is usually allowed, and checking
        one token is cheap. Only when it is rejected is the whole vocabulary
        masked, and the best allowed token taken: the same token the masked
        chain would pick, so the output is identical.
        """
        token = int(logits.argmax())
        one = self._one_candidate
        one["id"] = token
        one["logit"] = logits[token]
        one["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            one.ctypes.data_as(llama_cpp.llama_token_data_p), 1, -1, False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
        if not math.isfinite(float(one["logit"][0])):
            self._apply_to_vocab(grammar, logits)
            cand = self._candidates
            best = int(cand["logit"].argmax())
            if not math.isfinite(float(cand["logit"][best])):
                return None
            token = int(cand["id"][best])
        llama_cpp.llama_sampler_accept(grammar, token)
        return token

    def free(self) -> None:
        while self._grammars:
            llama_cpp.llama_sampler_free(self._grammars.popitem()[1])
