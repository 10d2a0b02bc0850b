"""Embeddings from a GGUF model: a second llama.cpp context on the loaded weights.

Used by :meth:`engine.backends.llamacpp.LlamaCppBackend.embed_job`; created
on the first embedding request, so models only used for chat pay nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Generator, Sequence

import llama_cpp
import numpy as np

from protocol.errors import BadRequest

__all__ = ["EMBED_MAX_CTX", "EMBED_MAX_SEQS", "EmbeddingContext", "embedding_inputs"]

# Embeddings: a second context of at most EMBED_MAX_CTX positions. Each decode
# also yields logits for every token (llama.cpp computes them for all outputs),
# so the tokens per decode are sized to keep those under EMBED_OUTPUT_BYTES.
EMBED_MAX_CTX = 2048
EMBED_MAX_SEQS = 8
EMBED_OUTPUT_BYTES = 128 * 1024 * 1024

_POOLING = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "first",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
}


def embedding_inputs(
    vocab: object, texts: Sequence[str], truncate: bool, limit: int
) -> list[list[int]]:
    """The tokens of each of ``texts``, checked (or cut) against ``limit`` before any work.

    Each input is tokenised with the model's BOS/EOS settings and without
    parsing control tokens (it is data, not a prompt). ``truncate`` keeps the
    first tokens of a longer input (its final EOS too, for models that add
    one), as Ollama does; otherwise a longer input is a :class:`BadRequest`.
    """
    if not texts:
        raise BadRequest("no inputs to embed")
    add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    inputs: list[list[int]] = []
    for i, text in enumerate(texts):
        if not text:
            raise BadRequest(f"input {i} is empty")
        data = text.encode("utf-8")
        cap = len(data) + 8
        out = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), out, cap, True, False)
        if n < 0:  # pragma: no cover - more tokens than bytes + 8 cannot happen
            raise RuntimeError(f"tokenizer needs {-n} slots")
        tokens = list(out[:n])
        if len(tokens) > limit:
            if not truncate:
                raise BadRequest(
                    f"input {i} is longer than the context "
                    f"({len(tokens)} tokens; the limit is {limit})"
                )
            tokens = tokens[: limit - 1] + tokens[-1:] if add_eos else tokens[:limit]
        inputs.append(tokens)
    return inputs


class EmbeddingContext:
    """A second llama.cpp context on the loaded weights, with embeddings switched on.

    Created on the first :meth:`LlamaCppBackend.embed` so that models only used
    for chat pay nothing. The context runs with pooling ``NONE`` and the vectors
    are pooled here, with numpy, from the per-token hidden states (after the
    final norm, the same values llama.cpp pools): llama.cpp's own pooling only
    sees one micro-batch, so a pooled input would have to fit one micro-batch,
    and every token of it also yields a row of logits (``n_vocab`` floats). For
    SmolLM2, 2,048 tokens in one micro-batch took about 800 MB; pooling here lets
    a long input be read in chunks of ``n_batch`` tokens instead (a causal model
    carries the earlier chunks in its KV cache), which bounds that memory.
    Non-causal (encoder) models need all of an input in one micro-batch; they
    have no LM head, so their chunk is the whole context.
    """

    def __init__(self, model: object, n_ctx: int, n_threads: int, n_vocab: int) -> None:
        self.pooling = "mean"
        arch = self._meta(model, "general.architecture")
        if arch:
            declared = self._meta(model, f"{arch}.pooling_type")
            if declared and declared.isdigit():
                # An embedding model says how it pools; a chat model does not (mean).
                self.pooling = _POOLING.get(int(declared), "mean")
            causal = self._meta(model, f"{arch}.attention.causal") != "false"
        else:
            causal = True
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model))
        self.n_ctx = n_ctx
        per_token = 8 * (n_vocab + self.n_embd)  # output rows + the graph's copy
        chunk = max(32, min(512, EMBED_OUTPUT_BYTES // per_token) // 32 * 32)
        self.n_batch = min(chunk, n_ctx) if causal else n_ctx
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = EMBED_MAX_SEQS
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        cparams.kv_unified = True  # one input may use the whole window
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a {n_ctx}-token embedding context")
        self.ctx: object = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    @staticmethod
    def _meta(model: object, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""

    def run(self, inputs: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        """Pooled, L2-normalised vectors of tokenised inputs (each at most ``n_ctx`` tokens).

        A generator that runs one ``llama_decode`` per step, so the worker can
        interleave it with generation steps. Inputs go in groups of at most
        ``EMBED_MAX_SEQS`` sequences and ``n_ctx`` tokens, one sequence id each; a
        group is decoded ``n_batch`` tokens at a time (a non-causal model has
        ``n_batch == n_ctx``: one decode) and the KV cache is cleared before the
        next group. Only one run may be in progress at a time.
        """
        vectors: list[list[float]] = []
        start = 0
        while start < len(inputs):
            end, used = start, 0
            while (
                end < len(inputs)
                and end - start < EMBED_MAX_SEQS
                and used + len(inputs[end]) <= self.n_ctx
            ):
                used += len(inputs[end])
                end += 1
            group = inputs[start:end]
            llama_cpp.llama_memory_clear(self.mem, True)
            sums = np.zeros((len(group), self.n_embd), dtype=np.float64)
            work = [(seq, pos) for seq, tokens in enumerate(group) for pos in range(len(tokens))]
            for first in range(0, len(work), self.n_batch):
                self._decode(group, work[first : first + self.n_batch], sums)
                yield
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            vectors += (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32).tolist()
            start = end
        return vectors

    def _decode(
        self, group: list[list[int]], items: list[tuple[int, int]], sums: np.ndarray
    ) -> None:
        batch = self.batch
        for i, (seq, pos) in enumerate(items):
            batch.token[i] = group[seq][pos]
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1  # every token's hidden state is pooled
        batch.n_tokens = len(items)
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) while embedding")
        ptr = llama_cpp.llama_get_embeddings(self.ctx)
        if not ptr:
            raise RuntimeError("llama.cpp returned no embeddings")
        rows = np.ctypeslib.as_array(ptr, shape=(len(items), self.n_embd))
        seqs = np.fromiter((seq for seq, _ in items), dtype=np.intp, count=len(items))
        if self.pooling == "mean":
            np.add.at(sums, seqs, rows)
            return
        for i, (seq, pos) in enumerate(items):
            if (pos == 0) if self.pooling == "first" else (pos == len(group[seq]) - 1):
                sums[seq] = rows[i]

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
