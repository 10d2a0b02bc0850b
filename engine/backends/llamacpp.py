"""GGUF models through llama-cpp-python: the default backend.

Decoding uses ``Llama.generate``: llama.cpp samples (temperature, top-k,
top-p, min-p, repeat penalty, seed) and the generator is advanced one token
per :meth:`step`, so a cancelled sequence costs at most the step in progress.
The same ``Llama`` keeps the previous prompt's KV cache and reuses its longest
common prefix, which makes follow-up turns of a conversation cheap.

One sequence at a time (``max_sequences = 1``); batching several sequences
into one ``llama_decode`` fits behind the same interface later.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Generator, Sequence

import llama_cpp

from engine.backends.base import Backend, LoadParams
from engine.backends.select import check_model_file
from engine.requests import SamplingParams
from protocol.errors import ModelLoadError

__all__ = ["LlamaCppBackend"]

MAX_DEFAULT_CTX = 4096


def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs to stderr by default; workers keep stderr for their own records."""


_log_callback = llama_cpp.llama_log_callback(_quiet_log)


class LlamaCppBackend(Backend):
    name = "llama_cpp"
    max_sequences = 1

    def __init__(self, llm: llama_cpp.Llama, chat_template: str | None) -> None:
        self._llm = llm
        self._vocab = llm._model.vocab
        self.n_ctx = llm.n_ctx()
        self.chat_template = chat_template
        self.bos_text = self._special_text(llm.token_bos())
        self.eos_text = self._special_text(llm.token_eos())
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)
        self._seq: int | None = None
        self._gen: Generator[int, Sequence[int] | None, None] | None = None

    @classmethod
    def load(cls, path: str, params: LoadParams) -> LlamaCppBackend:
        header = check_model_file(path, cls.name)
        n_ctx = params.n_ctx or min(header.context_length or 2048, MAX_DEFAULT_CTX)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        try:
            llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=n_ctx,
                n_batch=min(params.n_batch, n_ctx),
                n_threads=params.n_threads,
                n_threads_batch=params.n_threads,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(path, "backend", f"llama.cpp could not load it ({exc})") from None
        return cls(llm, header.chat_template)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

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

    def start(self, seq: int, prompt: list[int], sampling: SamplingParams) -> None:
        if self._seq is not None:
            raise RuntimeError("llama_cpp backend holds one sequence at a time")
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32) & 0x7FFFFFFF
        self._llm.set_seed(seed)
        self._gen = self._llm.generate(
            prompt,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
            reset=True,
        )
        self._seq = seq

    def context_used(self, seq: int) -> int:
        return int(self._llm.n_tokens)

    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        if self._gen is None or list(seqs) != [self._seq]:
            raise RuntimeError(f"no such sequence: {seqs}")
        return {seqs[0]: next(self._gen)}

    def finish(self, seq: int) -> None:
        if seq == self._seq and self._gen is not None:
            self._gen.close()
            self._gen = None
            self._seq = None

    def free(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        self._llm.close()
