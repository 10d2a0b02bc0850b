"""GGUF models through llama.cpp (llama-cpp-python's low-level API): the default backend.

One llama.cpp context holds up to ``n_seq`` sequences, each with its own
window of ``n_ctx`` cache cells (or, with ``kv_unified``, all in one shared
cache of ``n_ctx`` cells). A :meth:`step` builds one ``llama_batch`` as
:func:`engine.stepplan.plan_step` says: the next token of every decoding
sequence, then prompt chunks, shortest remaining prompt first, at most
``prefill_chunk`` prompt tokens while anything decodes. One ``llama_decode``
runs it: several streams cost less than running them apart, and a long prompt
never stalls running streams for more than one chunk.

Each sequence's token is then chosen from its logits (:mod:`engine.backends.llamapick`:
a numpy argmax for greedy requests, llama.cpp's samplers for the rest and for
grammars).

Embeddings use a second context on the same weights, created on first use
(:mod:`engine.backends.llamaembed`).

Each window keeps its cache after its sequence ends, and a new sequence reads
only what no window holds yet: a conversation's next turn reads its new
messages, a chat opening with a known system prompt copies it
(:mod:`engine.backends.llamacache` carries out what
:mod:`engine.backends.llamaslots` decides). Idle windows give their cells
back when running sequences need room.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import llama_cpp.llama_grammar

from engine.backends.base import Embedder, EmbedJob, LoadParams, TextGenerator
from engine.backends.gguf_entry import check_model_file, vision_pair
from engine.backends.llamaahead import ahead_slots, read_ahead
from engine.backends.llamacache import SlotCaches
from engine.backends.llamaembed import EMBED_MAX_CTX, EmbeddingContext, embedding_inputs
from engine.backends.llamalora import LoraSets, lora_key, step_group
from engine.backends.llamapick import pick
from engine.backends.llamasampling import (
    PENALTY_LAST_N,
    Samplers,
    capturing_errors,
    log_callback,
)
from engine.backends.llamaseq import SeqState
from engine.backends.llamavision import VisionInput
from engine.interrupt import strlen_callback_address
from engine.requests import Adapter, SamplingParams
from engine.stepplan import Want, plan_step
from protocol.errors import BadRequest, ModelLoadError, Overloaded

__all__ = ["LlamaCppBackend"]

MAX_DEFAULT_CTX = 4096

_initialised = False


def init_llama_cpp() -> None:
    """Initialise llama.cpp once per process, its log routed to ours (warnings and errors)."""
    global _initialised
    if not _initialised:
        llama_cpp.llama_log_set(log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


class LlamaCppBackend(TextGenerator, Embedder):
    name = "llama_cpp"
    supports_adapters = True

    def __init__(
        self,
        model: object,
        ctx: object,
        chat_template: str | None,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        n_threads: int,
        prefill_chunk: int = 64,
        unified: bool = False,
    ) -> None:
        self._model = model
        self._chunk = max(1, prefill_chunk)
        self._unified = unified
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
        self._caches = SlotCaches(ctx, n_seq, unified)
        self._seqs: dict[int, SeqState] = {}
        self._n_threads = n_threads
        self._failed: dict[int, Exception] = {}
        self._samplers = Samplers(self._vocab, self._n_vocab)
        self._emb: EmbeddingContext | None = None
        self._abort: object | None = None  # the interrupt callback, kept alive
        self._lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        self._lora = LoraSets(model, ctx, capturing_errors)
        self._vision: VisionInput | None = None  # a vision language model's projector

    @classmethod
    def load(cls, path: str, params: LoadParams) -> LlamaCppBackend:
        projector = None
        pair = vision_pair(path)
        if pair is not None:  # a vision language model: the text model and its projector
            path, projector = str(pair[0]), pair[1]
        header = check_model_file(path, cls.name)
        init_llama_cpp()
        n_ctx = params.n_ctx or min(header.context_length or 2048, MAX_DEFAULT_CTX)
        n_batch = max(1, min(params.n_batch, n_ctx))
        mparams = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise ModelLoadError(path, "backend", "llama.cpp could not load the model")
        n_seq = max(1, params.n_seq)
        cparams = llama_cpp.llama_context_default_params()
        # Split: each sequence gets a window of n_ctx cells (llama.cpp divides the
        # context by n_seq_max); unified: all share n_ctx cells.
        cparams.n_ctx = n_ctx if params.kv_unified else n_ctx * n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        cparams.kv_unified = params.kv_unified
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(
                path,
                "backend",
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens",
            )
        if not params.kv_unified:
            n_ctx = min(n_ctx, int(llama_cpp.llama_n_ctx(ctx)) // n_seq)
        template = params.chat_template or header.chat_template
        backend = cls(
            model,
            ctx,
            template,
            n_ctx,
            n_seq,
            n_batch,
            params.n_threads,
            params.prefill_chunk,
            params.kv_unified,
        )
        if projector is not None:
            try:
                backend._vision = VisionInput(
                    model, str(projector), params.n_threads, backend._n_vocab, log_callback
                )
            except BaseException:
                backend.free()
                raise
            backend.reads_images = True
            backend.image_marker = backend._vision.marker
        return backend

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

    def tokenize_with_images(self, text: str, images: list[bytes]) -> list[int]:
        if self._vision is None:
            return super().tokenize_with_images(text, images)
        add_bos = not (self.bos_text and text.startswith(self.bos_text))
        return self._vision.tokenize(text, images, add_bos)

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

    def check_sampling(self, sampling: SamplingParams) -> None:
        self._samplers.check(sampling)

    # -- sequences ------------------------------------------------------------------

    def start(
        self,
        seq: int,
        prompt: list[int],
        sampling: SamplingParams,
        priority: int = 0,
        urgent: bool = False,
        adapters: Sequence[Adapter] = (),
    ) -> None:
        if not self._caches.any_free():
            raise RuntimeError("no free sequence slot")
        lora = lora_key(adapters)
        if lora:  # first: a file llama.cpp refuses leaves no state behind
            self._lora.load(lora, (st.lora for st in self._seqs.values()))
        cache = lora
        if self._vision is not None and any(t >= self._n_vocab for t in prompt):
            cache = (*lora, (f"images of {seq}", 0.0))
        sampler = self._samplers.chain(sampling, prompt)  # first: a BadRequest leaves no state
        constraint = sampling.constraint()
        guide = None
        if constraint is not None and constraint[0] == "lark":
            guide = self._samplers.guides().guide(*constraint)
            constraint = None

        # Suspended sequences' windows are left alone while others are free: their
        # caches let them resume without reading anything again.
        held = [st.slot for st in self._seqs.values() if st.suspended]
        slot, prompt, keep = self._caches.place(prompt, cache, held, self.token_bytes, self.n_ctx)
        self._seqs[seq] = SeqState(
            slot,
            prompt[keep:],
            keep,
            sampler,
            constrained=constraint is not None,
            greedy_grammar=(
                constraint is not None
                and sampling.temperature == 0.0
                and sampling.repeat_penalty == 1.0
            ),
            priority=priority,
            guide=guide,
        )
        self._seqs[seq].reused = keep
        self._seqs[seq].lora = lora
        self._seqs[seq].cache_key = cache
        self._seqs[seq].urgent = urgent
        self._seqs[seq].logprobs = sampling.logprobs
        self._seqs[seq].ban_eog = sampling.ignore_eos
        if sampler is None and sampling.repeat_penalty != 1.0:
            state = self._seqs[seq]
            state.penalty = sampling.repeat_penalty
            # Image positions (ids past the vocabulary) are no tokens to penalise.
            state.recent.extend(t for t in prompt[-PENALTY_LAST_N:] if t < self._n_vocab)

    def set_interrupt(self, address: int) -> None:
        # strlen(flag) is true while the flag is up; it runs on the compute
        # thread without the GIL (engine.interrupt).
        self._abort = llama_cpp.ggml_abort_callback(strlen_callback_address())
        llama_cpp.llama_set_abort_callback(self._ctx, self._abort, ctypes.c_void_p(address))

    def prompt_reused(self, seq: int) -> int:
        st = self._seqs.get(seq)
        return st.reused if st is not None else 0

    can_suspend = True

    def suspend(self, seq: int) -> None:
        st = self._seqs[seq]
        slot = st.slot
        # What the sequence has read so far (its slot's cache holds exactly these),
        # then what it still has to feed (a prompt's rest, or its last sampled token).
        st.tokens = slot.history[: st.n_past] + st.pending
        slot.busy = False
        st.suspended = True

    def resume(self, seq: int) -> None:
        st = self._seqs[seq]
        if not st.suspended:
            raise RuntimeError("not suspended")
        tokens = st.tokens
        slot, keep = self._caches.reclaim(tokens, st.cache_key, st.slot)
        st.slot = slot
        st.n_past = keep
        st.pending = tokens[keep:]
        st.decoding = False  # reads the rest first; its next sample is a new token
        st.passed = 0
        st.suspended = False
        st.tokens = []

    def context_used(self, seq: int) -> int:
        return self._seqs[seq].n_past

    def has_room(self, n_prompt: int) -> bool:
        if not self._unified or not self._seqs:
            return True  # a window of its own; or alone, the whole shared cache
        held = sum(st.n_past + len(st.pending) for st in self._seqs.values())
        return held + n_prompt <= self.n_ctx

    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        self._failed = {}
        states = [(seq, self._seqs[seq]) for seq in seqs]
        if any(st.lora for _, st in states) or self._lora.turn:
            # One adapter set per decode: the sets take turns (engine.backends.llamalora).
            group = step_group([st.lora for _, st in states], self._lora.turn)
            self._lora.turn += 1
            states = [(seq, st) for seq, st in states if st.lora == group]
            self._lora.apply(group)
        if self._vision is not None:
            self._read_images(states)
        while True:
            plan = self._fill(states)
            if not plan:
                return {}
            rc = llama_cpp.llama_decode(self._ctx, self._batch)
            if rc == 2:
                # Stopped by the interrupt flag. llama.cpp drops what the interrupted
                # micro-batch wrote, but a step of uneven sequences runs as several
                # (one per equal split): those finished before it keep their cells.
                # No sequence advanced, so each is cut back to what it has read.
                for _, st, _, _ in plan:
                    llama_cpp.llama_memory_seq_rm(self._mem, st.slot.index, st.n_past, -1)
                return {}
            if rc == 1 and self._caches.release_idle():
                rc = llama_cpp.llama_decode(self._ctx, self._batch)
            if rc == 1 and len(plan) > 1 and self._unified:
                # The sequences share one KV cache of n_ctx cells and together no
                # longer fit: the one holding the most cells ends (retryable), its
                # cells are freed and the others go on in the same step.
                seq, st, _, _ = max(plan, key=lambda p: p[1].n_past + p[2])
                self._failed[seq] = Overloaded(
                    f"the {self.n_ctx}-token context this worker shares between "
                    f"{len(plan)} sequences is full; retry when fewer are running"
                )
                self._caches.drop(st.slot)
                st.pending = []
                states = [(q, s) for q, s in states if q != seq]
                continue
            if rc != 0:
                raise RuntimeError(
                    f"llama_decode failed ({rc}): the KV cache is full"
                    if rc == 1
                    else f"llama_decode failed ({rc})"
                )
            break
        out: dict[int, int] = {}
        planned = {seq for seq, _, _, _ in plan}
        for seq, st in states:
            if not st.decoding and st.pending:
                st.passed = 0 if seq in planned else st.passed + 1
        for seq, st, take, idx in plan:
            st.slot.history.extend(st.pending[:take])
            st.n_past += take
            if idx < 0:
                del st.pending[:take]
                continue
            st.decoding = True
            st.urgent = False
            try:
                token, lps = pick(self._ctx, idx, st, self._samplers, self._n_vocab)
            except BadRequest as exc:
                st.pending = []
                self._failed[seq] = exc
                continue
            if lps is not None:
                self._lps[seq] = lps
            st.pending = [token]
            out[seq] = token
        return out

    def _read_images(self, states: list[tuple[int, SeqState]]) -> None:
        """Decode the image each sequence has reached (its next pending positions), before
        the step's tokens: an image goes into the context as embeddings, by itself."""
        assert self._vision is not None
        for seq, st in states:
            pending = st.pending
            if not pending or not self._vision.is_image(pending[0]):
                continue
            n = 1
            while n < len(pending) and pending[n] == pending[0]:
                n += 1
            try:
                st.n_past = self._vision.decode(
                    self._ctx, pending[0], st.n_past, st.slot.index, self._n_batch
                )
            except Overloaded as exc:
                self._failed[seq] = exc
                st.pending = []
                continue
            st.slot.history.extend(pending[:n])
            del pending[:n]

    def _text_run(self, pending: list[int]) -> int:
        """How many of ``pending`` are tokens before the next image (all, without one)."""
        if self._vision is None:
            return len(pending)
        for i, token in enumerate(pending):
            if token >= self._n_vocab:
                return i
        return len(pending)

    def _fill(self, states: list[tuple[int, SeqState]]) -> list[tuple[int, SeqState, int, int]]:
        """Put the step's tokens in the batch: (seq, state, tokens fed, logits index) each."""
        batch = self._batch
        n = 0
        by_seq = dict(states)
        wants = [
            Want(seq, self._text_run(st.pending), st.decoding, st.priority, st.passed, st.urgent)
            for seq, st in states
        ]
        plan: list[tuple[int, SeqState, int, int]] = []
        # In slot order: llama.cpp splits a batch into per-sequence groups, and a
        # batch whose sequences come in slot order decoded ~10 % faster at 8 streams.
        steps = plan_step(wants, batch=self._n_batch, chunk=self._chunk)
        for seq, take in sorted(steps, key=lambda p: by_seq[p[0]].slot.index):
            st = by_seq[seq]
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
        batch.n_tokens = n
        return plan

    def failed(self) -> dict[int, Exception]:
        failed, self._failed = self._failed, {}
        return failed

    def take_logprobs(self, seq: int) -> tuple[float, list[tuple[int, float]]] | None:
        return self._lps.pop(seq, None)

    def anticipate(self, seq: int, turn: Sequence[int]) -> None:
        st = self._seqs.get(seq)
        if st is None or self._abort is None or not turn or st.suspended or not st.decoding:
            return  # a read that nothing could stop would hold requests up
        slot = st.slot
        if st.lora or st.cache_key or st.n_past != len(slot.history):
            return  # adapters or images: their caches are matched apart
        ahead = [t for t in st.pending if not self.is_end(t)] + list(turn)
        if len(slot.history) + len(ahead) < self.n_ctx and len(ahead) <= self._n_batch:
            slot.ahead, slot.ahead_at, slot.ahead_tries = ahead, len(slot.history), 0

    def reads_ahead(self) -> bool:
        return bool(ahead_slots(self._caches.slots))

    def read_ahead(self) -> int:
        self._lora.apply(())
        return read_ahead(self._ctx, self._mem, self._batch, self._n_batch, self._caches.slots)

    def finish(self, seq: int) -> None:
        st = self._seqs.pop(seq, None)
        if st is None:
            return
        if self._vision is not None and st.cache_key != st.lora:
            self._vision.release(st.slot.history + st.pending + st.tokens)
        if not st.suspended:
            st.slot.busy = False
        if st.sampler is not None:
            llama_cpp.llama_sampler_free(st.sampler)

    # -- embeddings -----------------------------------------------------------------

    def embed_job(self, texts: Sequence[str], truncate: bool) -> EmbedJob:
        """Mean-pooled (or the model's own pooling), unit-length vectors of ``texts``.

        Runs in a second context of at most ``EMBED_MAX_CTX`` positions, one
        decode per step of the returned job; inputs too long for it are cut or
        refused (``truncate``) before any work (:func:`embedding_inputs`).
        """
        limit = min(self.n_ctx, EMBED_MAX_CTX)
        inputs = embedding_inputs(self._vocab, texts, truncate, limit)
        if self._emb is None:
            self._emb = EmbeddingContext(self._model, limit, self._n_threads, self._n_vocab)
        return self._embed_run(self._emb, inputs)

    @staticmethod
    def _embed_run(emb: EmbeddingContext, inputs: list[list[int]]) -> EmbedJob:
        vectors = yield from emb.run(inputs)
        return vectors, sum(map(len, inputs))

    def free(self) -> None:
        for seq in list(self._seqs):
            self.finish(seq)
        self._samplers.free()
        if self._emb is not None:
            self._emb.free()
            self._emb = None
        self._lora.free()
        if self._vision is not None:
            self._vision.free()
            self._vision = None
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)
