"""GGUF llama files through ctransformers: an optional backend.

ctransformers ships prebuilt libraries and installs in seconds, which makes it
a fallback where llama-cpp-python cannot be built. It serialises concurrent
generation and cannot load every model (SmolLM2's GPT-2 style vocabulary, for
one); it has no min-p sampling, so ``min_p`` is ignored here. It has no grammar
sampler and no embeddings either: structured output fails with ``bad_request``
(the default of :meth:`~engine.backends.base.TextGenerator.check_sampling`),
and it is no :class:`~engine.backends.base.Embedder`, so the worker refuses
embedding requests with ``bad_request``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from ctransformers import AutoModelForCausalLM

from engine.backends.base import LoadParams, TextGenerator
from engine.backends.gguf_entry import check_model_file
from engine.requests import SamplingParams
from protocol.errors import ModelLoadError

__all__ = ["CTransformersBackend"]


class CTransformersBackend(TextGenerator):
    name = "ctransformers"

    def __init__(self, llm: object, n_ctx: int, chat_template: str | None, n_threads: int) -> None:
        self._llm: object = llm
        self.n_ctx = n_ctx
        self.chat_template = chat_template
        self.bos_text = "<s>"
        self.eos_text = "</s>"
        self._threads = n_threads
        self._seq: int | None = None
        self._pending: list[int] = []
        self._sampling = SamplingParams()
        self._used = 0
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def load(cls, path: str, params: LoadParams) -> CTransformersBackend:
        header = check_model_file(path, cls.name)
        n_ctx = params.n_ctx or min(header.context_length or 2048, 4096)
        try:
            llm = AutoModelForCausalLM.from_pretrained(
                path,
                model_type="llama",
                context_length=n_ctx,
                threads=params.n_threads,
                batch_size=params.n_batch,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                path, "backend", f"ctransformers could not load it ({exc})"
            ) from None
        return cls(llm, n_ctx, params.chat_template or header.chat_template, params.n_threads)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        # ctransformers sizes its buffer by characters; byte fallback needs one per byte.
        buf = (ctypes.c_int * (len(data) + 2))()
        llm: object = self._llm
        n = llm.ctransformers_llm_tokenize(data, add_bos, buf)  # type: ignore[attr-defined]
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in tokens)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = bytes(self._llm.ctransformers_llm_detokenize(token))  # type: ignore[attr-defined]
            self._pieces[token] = piece
        return piece

    def is_end(self, token: int) -> bool:
        return bool(self._llm.is_eos_token(token))  # type: ignore[attr-defined]

    def start(
        self,
        seq: int,
        prompt: list[int],
        sampling: SamplingParams,
        priority: int = 0,
        urgent: bool = False,
    ) -> None:
        self.check_sampling(sampling)  # the worker checks too; start() must never ignore it
        if self._seq is not None:
            raise RuntimeError("ctransformers backend holds one sequence at a time")
        self._llm.ctransformers_llm_reset()  # type: ignore[attr-defined]
        self._seq = seq
        self._pending = list(prompt)
        self._sampling = sampling
        self._used = 0

    def context_used(self, seq: int) -> int:
        return self._used

    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        if list(seqs) != [self._seq] or self._seq is None:
            raise RuntimeError(f"no such sequence: {seqs}")
        s = self._sampling
        llm: object = self._llm
        llm.eval(self._pending, threads=self._threads)  # type: ignore[attr-defined]
        self._used += len(self._pending)
        token: int = llm.sample(  # type: ignore[attr-defined]
            top_k=s.top_k,
            top_p=s.top_p,
            temperature=s.temperature,
            repetition_penalty=s.repeat_penalty,
            last_n_tokens=64,
            seed=s.seed if s.seed is not None else -1,
        )
        self._pending = [token]
        return {self._seq: token}

    def finish(self, seq: int) -> None:
        if seq == self._seq:
            self._seq = None
            self._pending = []

    def free(self) -> None:
        self._llm = None
