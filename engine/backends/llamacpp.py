"""GGUF models through llama.cpp (llama-cpp-python's low-level API): the default backend.

One llama.cpp context holds up to ``n_seq`` sequences in a unified KV cache
(each may use the whole context window). A :meth:`step` builds one
``llama_batch`` with the next token of every decoding sequence plus, within the
``n_batch`` budget, a chunk of any prompt still being read, and runs one
``llama_decode``: several streams cost little more than one, and a long prompt
never stalls running streams for more than one chunk.

Sampling: greedy requests (temperature 0, no repeat penalty) take an argmax
over the logits with numpy; the rest use a llama.cpp sampler chain per
sequence (penalties, top-k, top-p, min-p, temperature, seeded draw).

Each slot remembers the tokens its KV cache holds after a sequence ends; a new
sequence takes the free slot sharing the longest prefix with its prompt and
only reads the rest, so follow-up turns of a conversation skip re-reading it.
Idle slots give their cache cells back when running sequences need room.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import cast

import llama_cpp
import numpy as np

from engine.backends.base import Backend, LoadParams
from engine.backends.select import check_model_file
from engine.requests import SamplingParams
from protocol.errors import ModelLoadError

__all__ = ["LlamaCppBackend"]

MAX_DEFAULT_CTX = 4096
PENALTY_LAST_N = 64


def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs to stderr by default; workers keep stderr for their own records."""


_log_callback = llama_cpp.llama_log_callback(_quiet_log)
_initialised = False


def _init_once() -> None:
    global _initialised
    if not _initialised:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


class _Slot:
    __slots__ = ("busy", "history", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = False
        self.history: list[int] = []  # tokens whose KV this slot holds, positions 0..n-1


class _SeqState:
    __slots__ = ("n_past", "pending", "sampler", "slot")

    def __init__(
        self, slot: _Slot, pending: list[int], n_past: int, sampler: object | None
    ) -> None:
        self.slot = slot
        self.pending = (
            pending  # tokens to feed: the prompt's unread part, then the last sampled token
        )
        self.n_past = n_past
        self.sampler = sampler  # llama_sampler pointer, or None for the greedy fast path


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(
        self,
        model: object,
        ctx: object,
        chat_template: str | None,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
    ) -> None:
        self._model = model
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_ctx = n_ctx
        self.max_sequences = n_seq
        self.chat_template = chat_template
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self._vocab))
        self._slots = [_Slot(i) for i in range(n_seq)]
        self._seqs: dict[int, _SeqState] = {}

    @classmethod
    def load(cls, path: str, params: LoadParams) -> LlamaCppBackend:
        header = check_model_file(path, cls.name)
        _init_once()
        n_ctx = params.n_ctx or min(header.context_length or 2048, MAX_DEFAULT_CTX)
        n_batch = max(1, min(params.n_batch, n_ctx))
        mparams = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise ModelLoadError(path, "backend", "llama.cpp could not load the model")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = max(1, params.n_seq)
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        cparams.kv_unified = True  # every sequence may use the whole window
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(
                path, "backend", f"llama.cpp could not create a {n_ctx}-token context"
            )
        template = params.chat_template or header.chat_template
        return cls(model, ctx, template, n_ctx, max(1, params.n_seq), n_batch)

    # -- vocabulary -----------------------------------------------------------------

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, True)
        return self._buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        out = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), out, cap, add_bos, True)
        if n < 0:  # pragma: no cover - more tokens than bytes + 8 cannot happen
            raise RuntimeError(f"tokenizer needs {-n} slots")
        return list(out[:n])

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in tokens)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = llama_cpp.llama_token_to_piece(
                self._vocab, token, self._buf, len(self._buf), 0, False
            )
            piece = self._buf.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- sequences ------------------------------------------------------------------

    def _sampler(self, s: SamplingParams, prompt: list[int]) -> object | None:
        if s.temperature == 0.0 and s.repeat_penalty == 1.0:
            return None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if s.repeat_penalty != 1.0:
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    self._n_vocab, PENALTY_LAST_N, s.repeat_penalty, 0.0, 0.0
                ),
            )
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
        if s.repeat_penalty != 1.0:
            for tok in prompt[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(chain, tok)
        return cast(object, chain)

    def start(self, seq: int, prompt: list[int], sampling: SamplingParams) -> None:
        free = [s for s in self._slots if not s.busy]
        if not free:
            raise RuntimeError("no free sequence slot")

        def shared(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.history, prompt, strict=False):
                if a != b:
                    break
                n += 1
            return n

        slot = max(free, key=shared)
        keep = min(shared(slot), len(prompt) - 1)  # read at least one token to get logits
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot.index, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
            keep = 0
        del slot.history[keep:]
        slot.busy = True
        self._seqs[seq] = _SeqState(slot, prompt[keep:], keep, self._sampler(sampling, prompt))

    def context_used(self, seq: int) -> int:
        return self._seqs[seq].n_past

    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        states = [(seq, self._seqs[seq]) for seq in seqs]
        batch = self._batch
        n = 0
        budget = self._n_batch
        plan: list[tuple[int, _SeqState, int, int]] = []  # seq, state, tokens fed, logits index
        # Decoding sequences first (one token each), then prompt chunks in what is left.
        for seq, st in sorted(states, key=lambda x: len(x[1].pending)):
            take = min(len(st.pending), budget - n)
            if take <= 0:
                continue
            slot = st.slot.index
            for i in range(take):
                batch.token[n] = st.pending[i]
                batch.pos[n] = st.n_past + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot
                batch.logits[n] = 0
                n += 1
            done = take == len(st.pending)
            if done:
                batch.logits[n - 1] = 1
            plan.append((seq, st, take, n - 1 if done else -1))
        if not n:
            return {}
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc == 1 and self._release_idle():
            rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(
                f"llama_decode failed ({rc}): the KV cache is full"
                if rc == 1
                else f"llama_decode failed ({rc})"
            )
        out: dict[int, int] = {}
        for seq, st, take, idx in plan:
            st.slot.history.extend(st.pending[:take])
            st.n_past += take
            if idx < 0:
                del st.pending[:take]
                continue
            if st.sampler is None:
                ptr = llama_cpp.llama_get_logits_ith(self._ctx, idx)
                token = int(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).argmax())
            else:
                token = int(llama_cpp.llama_sampler_sample(st.sampler, self._ctx, idx))
            st.pending = [token]
            out[seq] = token
        return out

    def _release_idle(self) -> bool:
        """Drop the cached prefixes of idle slots; True if that freed anything."""
        freed = False
        for slot in self._slots:
            if not slot.busy and slot.history:
                llama_cpp.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
                slot.history = []
                freed = True
        return freed

    def finish(self, seq: int) -> None:
        st = self._seqs.pop(seq, None)
        if st is None:
            return
        st.slot.busy = False
        if st.sampler is not None:
            llama_cpp.llama_sampler_free(st.sampler)

    def free(self) -> None:
        for seq in list(self._seqs):
            self.finish(seq)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)
