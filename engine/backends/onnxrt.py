"""ONNX decoder language models through onnxruntime, with our own batched decode loop.

A model is a folder: ``model.onnx`` (+ external data), ``tokenizer.json``, and
optionally ``config.json``, ``generation_config.json``, ``tokenizer_config.json``
(chat template, special tokens) or ``chat_template.jinja``. Inputs and outputs
are found by the names Optimum and onnxruntime-genai use, read from the graph
rather than assumed: ``input_ids``, ``attention_mask``, ``position_ids``
(optional), ``past_key_values.{i}.key|value`` in, ``logits`` and
``present.{i}.key|value`` out; the KV shape [batch, kv_heads, seq, head_dim]
comes from the graph's declared dimensions, or ``config.json`` when they are
symbolic.

Batching: every :meth:`step` runs all decoding sequences in one
``session.run``. Rows are left-padded to the longest past; the attention mask
hides the padding and each row carries its own positions, so a row's logits
are the ones it would get alone. A sequence still reading its prompt runs
alone (its first step is its prefill), because its input length differs.
Graphs with ``GroupQueryAttention`` (see :mod:`engine.onnx.fused`) instead
keep one KV buffer per layer that the graph appends to in place through
IOBinding (:class:`~engine.backends.onnxkv.SharedKV`): rows are right-padded and nothing is copied
per token. There a prompt is read at most ``PROMPT_CHUNK`` tokens per step,
so a long prompt does not stall the running streams for its whole length
(the attention op reads several new tokens of one row with a past, not of
several rows, so prompts are still read one at a time).
``session.run`` releases the GIL, and the worker calls it from its one thread.

Prefix reuse: when a sequence is about to read its prompt, the longest run of
leading tokens it shares with a running sequence or with a recently finished
one (kept in :class:`~engine.backends.onnxkv.PrefixStore`, bounded by
``prefix_cache_mb``) has its keys and values copied instead of computed, so
only the rest of the prompt is read. A copy of a few megabytes replaces a prefill of tens of milliseconds per
token block: sessions sharing a system prompt, the next turn of a
conversation and retried requests start sooner. At least one prompt token is
always read, since its logits give the first completion token.

Sampling is numpy (:mod:`engine.backends.numpysampler`): greedy argmax, or
repeat penalty, top-k, top-p, min-p and temperature with a seeded generator;
structured output and tool calls mask the logits through the grammar engine
(:mod:`engine.guidance`).

A folder holding ``pooling.json`` is a BERT encoder instead, which the
registry gives to :class:`~engine.backends.onnxembed.OnnxEncoderBackend`
(:mod:`engine.backends.onnx_entry`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from engine.backends.base import Backend, LoadParams, TextGenerator
from engine.backends.numpysampler import sample_token
from engine.backends.onnx_entry import OnnxOptions
from engine.backends.onnxfolder import is_byte_level, open_decoder_folder, token_piece
from engine.backends.onnxkv import PrefixStore, SeqState, SharedKV, common_prefix
from engine.guidance import GuideFactory
from engine.logprobs import token_logprobs
from engine.requests import SamplingParams
from engine.stepplan import Want, plan_step
from protocol.errors import BadRequest

__all__ = ["MIN_REUSE", "PROMPT_CHUNK", "OnnxBackend"]

MIN_REUSE = 8  # the shortest shared prefix worth copying
PROMPT_CHUNK = 256  # prompt tokens read per step (shared-buffer graphs)


class OnnxBackend(TextGenerator):
    """An ONNX decoder folder (see the module docstring): text generation, batched."""

    name = "onnx"

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        *,
        n_ctx: int,
        n_seq: int,
        n_layer: int,
        kv_heads: int,
        head_dim: int,
        eos_ids: set[int],
        bos_id: int | None,
        chat_template: str | None,
        has_positions: bool,
        shared_kv: bool = False,
        prefix_cache_bytes: int = 0,
        prefix_reuse: bool = True,
        tokenizer_json: str = "",
    ) -> None:
        self._session = session
        self.providers = list(session.get_providers())
        self._tok = tokenizer
        self._tokenizer_json = tokenizer_json  # for the grammar engine, built on first use
        self._guides: GuideFactory | None = None
        self._failed: dict[int, Exception] = {}
        self._lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        self.n_ctx = n_ctx
        self.max_sequences = max(1, n_seq)
        self._n_layer = n_layer
        self._kv_heads = kv_heads
        self._head_dim = head_dim
        self._eos = eos_ids
        self._bos = bos_id
        self.chat_template = chat_template
        self._has_positions = has_positions
        self.bos_text = tokenizer.id_to_token(bos_id) or "" if bos_id is not None else ""
        eos_first = min(eos_ids) if eos_ids else None
        self.eos_text = (tokenizer.id_to_token(eos_first) or "") if eos_first is not None else ""
        self._seqs: dict[int, SeqState] = {}
        self._pieces: dict[int, bytes] = {}
        self._byte_level = is_byte_level(tokenizer)
        self._special = {
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        }
        self._present = [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
        self._past = [
            f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")
        ]
        logits_shape = next(o.shape for o in session.get_outputs() if o.name == "logits")
        vocab = logits_shape[2] if len(logits_shape) == 3 else None
        static_logits = logits_shape[1] == 1 and isinstance(vocab, int)
        self._n_vocab = (
            vocab if isinstance(vocab, int) else tokenizer.get_vocab_size(with_added_tokens=True)
        )
        # What ignore_eos masks: the end tokens the logits have a place for.
        self._eos_ids = np.array(
            sorted(t for t in eos_ids if 0 <= t < self._n_vocab), dtype=np.intp
        )
        self._shared = (
            SharedKV(
                self.max_sequences,
                n_layer,
                kv_heads,
                head_dim,
                n_ctx,
                vocab if static_logits else None,
            )
            if shared_kv
            else None
        )
        self._reuse_on = prefix_reuse
        self._store = PrefixStore(prefix_cache_bytes if prefix_reuse else 0)
        self._token_bytes = 2 * n_layer * kv_heads * head_dim * 4  # keys and values, float32
        self.reused_tokens = 0  # prompt tokens copied instead of read, since loading

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, params: LoadParams) -> Backend:
        opts = params.options if isinstance(params.options, OnnxOptions) else OnnxOptions()
        f = open_decoder_folder(path, params, opts)
        return cls(
            f.session,
            f.tokenizer,
            n_ctx=f.n_ctx,
            n_seq=params.n_seq,
            n_layer=f.n_layer,
            kv_heads=f.kv_heads,
            head_dim=f.head_dim,
            eos_ids=f.eos_ids,
            bos_id=f.bos_id,
            chat_template=f.chat_template,
            has_positions=f.has_positions,
            shared_kv=f.shared_kv,
            prefix_cache_bytes=max(0, opts.prefix_cache_mb) * 2**20,
            prefix_reuse=opts.prefix_reuse,
            tokenizer_json=f.tokenizer_json,
        )

    # -- vocabulary ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self._bos is not None and (not ids or ids[0] != self._bos):
            ids.insert(0, self._bos)
        return ids

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            text = self._tok.id_to_token(token) or ""
            piece = b"" if text in self._special else token_piece(text, self._byte_level)
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in tokens)

    def is_end(self, token: int) -> bool:
        return token in self._eos

    # -- sequences ----------------------------------------------------------------------

    def check_sampling(self, sampling: SamplingParams) -> None:
        constraint = sampling.constraint()
        if constraint is not None:
            self._guide_factory().grammar(*constraint)

    def _guide_factory(self) -> GuideFactory:
        """The grammar engine over this tokenizer (structured output, tool calls)."""
        if self._guides is None:
            eos = sorted(self._eos) or None
            self._guides = GuideFactory.from_tokenizer_json(
                self._tokenizer_json, self._n_vocab, eos
            )
        return self._guides

    def failed(self) -> dict[int, Exception]:
        failed, self._failed = self._failed, {}
        return failed

    def take_logprobs(self, seq: int) -> tuple[float, list[tuple[int, float]]] | None:
        return self._lps.pop(seq, None)

    def start(
        self,
        seq: int,
        prompt: list[int],
        sampling: SamplingParams,
        priority: int = 0,
        urgent: bool = False,
    ) -> None:
        if self._active() >= self.max_sequences:
            raise RuntimeError("no free sequence slot")
        rng = np.random.default_rng(sampling.seed) if sampling.temperature > 0 else None
        constraint = sampling.constraint()
        guide = None if constraint is None else self._guide_factory().guide(*constraint)
        st = SeqState(
            list(prompt), sampling=sampling, rng=rng, priority=priority, urgent=urgent, guide=guide
        )
        if self._shared is not None:
            self._shared.take(st)
        self._seqs[seq] = st

    def _active(self) -> int:
        return sum(1 for st in self._seqs.values() if not st.suspended)

    # -- preemption (engine.preemption) -------------------------------------------------

    can_suspend = True

    def suspend(self, seq: int) -> None:
        """Pause ``seq``: its keys and values move out of the shared buffer into its own arrays.

        Copied exactly, not recomputed, so the sequence continues bit for bit
        where it stopped (a recomputed prefix may round differently and change
        a greedy pick). In copied mode a sequence holds its own arrays anyway.
        """
        st = self._seqs[seq]
        if st.suspended:
            return
        if self._shared is not None:
            st.past = [np.array(a) for a in self._kv_of(st)]
            self._shared.release(st)
        st.suspended = True

    def resume(self, seq: int) -> None:
        st = self._seqs[seq]
        if not st.suspended or self._active() >= self.max_sequences:
            raise RuntimeError("no free sequence slot to resume in")
        if self._shared is not None:
            self._shared.take(st)
            self._shared.reserve(st.n_past + len(st.pending))
            for buf, kept in zip(self._shared.buffers, st.past, strict=True):
                buf[st.slot, :, : st.n_past] = kept
            st.past = []
        st.suspended = False
        st.passed = 0

    def context_used(self, seq: int) -> int:
        return self._seqs[seq].n_past

    def prompt_reused(self, seq: int) -> int:
        st = self._seqs.get(seq)
        return st.reused if st is not None else 0

    def finish(self, seq: int) -> None:
        st = self._seqs.pop(seq, None)
        if st is None:
            return
        if st.n_past >= MIN_REUSE and st.n_past * self._token_bytes <= self._store.budget:
            self._keep(st)
        if self._shared is not None:
            self._shared.release(st)

    def free(self) -> None:
        for seq in list(self._seqs):
            self.finish(seq)
        self._store.clear()

    # -- prefix reuse -------------------------------------------------------------------

    def _kv_of(self, st: SeqState) -> list[np.ndarray]:
        """Views of ``st``'s keys and values, per layer and kind: [kv_heads, n_past, head_dim]."""
        if self._shared is not None and not st.suspended:
            return [b[st.slot, :, : st.n_past] for b in self._shared.buffers]
        return st.past

    def _keep(self, st: SeqState) -> None:
        kv = [np.array(a) for a in self._kv_of(st)] if self._shared is not None else st.past
        self._store.add(np.array(st.history[: st.n_past], dtype=np.int64), kv)

    def _reuse(self, st: SeqState, seen: dict[int, np.ndarray]) -> None:
        """Copy the keys and values of the longest known prefix of ``st``'s prompt into it.

        ``st`` may have read (or copied) part of its prompt already; only a
        source covering at least ``MIN_REUSE`` more tokens is used. ``seen``
        caches running sequences' tokens as arrays for the rest of the step.
        """
        prompt = st.history + st.pending  # history: the tokens already in its cache
        if not self._reuse_on or len(prompt) - st.n_past <= MIN_REUSE:
            return
        wanted = np.array(prompt[:-1], dtype=np.int64)  # the last token is always read
        best, source = 0, None
        head = prompt[:MIN_REUSE]
        for other in self._seqs.values():
            if other is st or other.n_past < MIN_REUSE or other.history[:MIN_REUSE] != head:
                continue  # (the cheap test above rules out most unrelated rows)
            tokens = seen.get(id(other))
            if tokens is None:
                tokens = seen[id(other)] = np.array(other.history[: other.n_past], dtype=np.int64)
            n = common_prefix(wanted, tokens)
            if n > best:
                best, source = n, self._kv_of(other)
        n, kept = self._store.best(wanted)
        if n > best:
            best, source = n, kept
        have = st.n_past
        if best - have < MIN_REUSE or source is None:
            return
        if self._shared is not None:
            self._shared.reserve(len(prompt))
            for buf, src in zip(self._shared.buffers, source, strict=True):
                buf[st.slot, :, have:best] = src[:, have:best]
        else:
            st.past = [np.ascontiguousarray(src[:, :best]) for src in source]
        st.history = prompt[:best]
        st.pending = prompt[best:]
        st.n_past = best
        st.reused += best - have
        self.reused_tokens += best - have

    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        states = [(s, self._seqs[s]) for s in seqs if s in self._seqs]
        out: dict[int, int] = {}
        seen: dict[int, np.ndarray] = {}
        for _, st in states:
            if not st.decoding:  # prompt not read yet: an earlier one may cover
                self._reuse(st, seen)  # (more of) it now; if all, it decodes now
        # The same plan as every batching backend's (engine.stepplan): which prompt
        # is read (shortest first within a class, none starved) and whether the
        # decoding rows run too (not when a higher class or an urgent one finishes
        # its prompt within the chunk).
        # Prompts are read one per step here: their lengths differ.
        chunk = len(self._seqs) * PROMPT_CHUNK if self._shared is None else PROMPT_CHUNK
        wants = [
            Want(s, len(st.pending), st.decoding, st.priority, st.passed, st.urgent)
            for s, st in states
        ]
        plan = [s for s, _ in plan_step(wants, batch=chunk + len(states), chunk=chunk)]
        by_seq = dict(states)
        decoding = [(s, by_seq[s]) for s in plan if by_seq[s].decoding]
        prefilling = [(s, st) for s, st in states if not st.decoding]
        reader = next(((s, by_seq[s]) for s in plan if not by_seq[s].decoding), None)
        for s, st in prefilling:
            st.passed = 0 if reader is not None and s == reader[0] else st.passed + 1
        if reader is not None:
            s, st = reader
            n_new = len(st.pending) if self._shared is None else min(len(st.pending), PROMPT_CHUNK)
            logits = self._run([st], n_new)
            if not st.pending:  # the whole prompt is read: its logits give the first token
                st.urgent = False  # owed a quick first token until it has one
                self._emit(out, s, st, logits[0])
        if decoding and self._shared is not None:
            # One run per block of adjacent rows: rows are packed, so this is one run
            # unless a paused (unstepped) sequence sits between decoding ones.
            rows = sorted(decoding, key=lambda item: item[1].slot)
            first = 0
            for end in range(1, len(rows) + 1):
                if end < len(rows) and rows[end][1].slot == rows[end - 1][1].slot + 1:
                    continue
                run = rows[first:end]
                logits = self._run([st for _, st in run], 1)
                for row, (s, st) in enumerate(run):
                    self._emit(out, s, st, logits[row])
                first = end
        elif decoding:
            logits = self._run([st for _, st in decoding], 1)
            for row, (s, st) in enumerate(decoding):
                self._emit(out, s, st, logits[row])
        return out

    def _emit(self, out: dict[int, int], seq: int, st: SeqState, logits: np.ndarray) -> None:
        token = self._sample(seq, st, logits)
        if token is not None:
            out[seq] = token

    def _run(self, batch: list[SeqState], n_new: int) -> np.ndarray:
        """One forward pass feeding the next ``n_new`` pending tokens of every row of ``batch``."""
        if self._shared is not None:
            return self._run_shared(batch, n_new)
        return self._run_copied(batch)

    def _run_shared(self, batch: list[SeqState], n_new: int) -> np.ndarray:
        """A run over adjacent rows of the shared buffer, which the graph appends to in place."""
        kv = self._shared
        assert kv is not None
        lengths = np.array([st.n_past + n_new for st in batch], dtype=np.int64)
        width = int(lengths.max())
        kv.reserve(width)
        io = kv.binding(self._session, self._past, self._present, batch[0].slot, len(batch))
        ids = np.array([st.pending[:n_new] for st in batch], dtype=np.int64)
        io.bind_cpu_input("input_ids", ids)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        io.bind_cpu_input("attention_mask", mask)
        if self._has_positions:
            positions = lengths[:, None] - n_new + np.arange(n_new)[None, :]
            io.bind_cpu_input("position_ids", positions.astype(np.int64))
        self._session.run_with_iobinding(io)
        if kv.logits is not None:
            logits = kv.logits[batch[0].slot : batch[0].slot + len(batch), 0, :]
        else:
            logits = np.asarray(io.get_outputs()[0].numpy())[:, -1, :]
        for st in batch:
            st.history.extend(st.pending[:n_new])
            del st.pending[:n_new]
            st.n_past += n_new
        return logits

    def _run_copied(self, batch: list[SeqState]) -> np.ndarray:
        """A run with each row's cache copied in (left-padded) and the new one copied out."""
        n_new = len(batch[0].pending)
        longest = max(st.n_past for st in batch)
        b = len(batch)
        ids = np.array([st.pending for st in batch], dtype=np.int64)
        mask = np.zeros((b, longest + n_new), dtype=np.int64)
        positions = np.zeros((b, n_new), dtype=np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        pasts = [
            np.zeros((b, self._kv_heads, longest, self._head_dim), dtype=np.float32)
            for _ in range(2 * self._n_layer)
        ]
        for row, st in enumerate(batch):
            pad = longest - st.n_past
            mask[row, pad:] = 1
            positions[row] = np.arange(st.n_past, st.n_past + n_new)
            for j, kv in enumerate(st.past):
                pasts[j][row, :, pad:, :] = kv
        feeds["attention_mask"] = mask
        if self._has_positions:
            feeds["position_ids"] = positions
        for i in range(self._n_layer):
            feeds[f"past_key_values.{i}.key"] = pasts[2 * i]
            feeds[f"past_key_values.{i}.value"] = pasts[2 * i + 1]
        names = ["logits"] + [
            f"present.{i}.{kind}" for i in range(self._n_layer) for kind in ("key", "value")
        ]
        results = self._session.run(names, feeds)
        logits = np.asarray(results[0])[:, -1, :]
        for row, st in enumerate(batch):
            pad = longest - st.n_past
            st.past = [np.ascontiguousarray(r[row, :, pad:, :]) for r in results[1:]]
            st.history.extend(st.pending)
            st.pending = []
            st.n_past += n_new
        return logits

    def _sample(self, seq: int, st: SeqState, logits: np.ndarray) -> int | None:
        if st.guide is not None and not st.guide.mask(logits):
            self._failed[seq] = BadRequest(
                f"the output cannot continue its grammar: {st.guide.error() or 'no token fits'}"
            )
            st.pending = []
            return None
        if st.sampling.ignore_eos and self._eos_ids.size:
            logits[self._eos_ids] = -np.inf  # never chosen, as llama.cpp's ignore_eos
        token = sample_token(logits, st.sampling, st.history, st.rng)
        if st.sampling.logprobs is not None:
            self._lps[seq] = token_logprobs(logits, token, st.sampling.logprobs)
        if st.guide is not None and not st.guide.accept(token):
            self._failed[seq] = BadRequest(f"the grammar refused a token: {st.guide.error()}")
            st.pending = []
            return None
        st.pending = [token]
        return token
