"""Log-probabilities of sampled tokens, for clients that ask for them (``logprobs``).

The figure is the model's own distribution at that step: a log-softmax over
the logits the sampler saw (after a grammar's mask, so a token the grammar
forbids has no probability), not the distribution after temperature or top-k.
Computed only for sequences that asked, in the worker, where the logits are.
"""

from __future__ import annotations

import msgspec
import numpy as np

__all__ = ["TokenLogprob", "TopLogprob", "token_logprobs"]


class TopLogprob(msgspec.Struct, array_like=True, frozen=True):
    token: int
    piece: bytes  # the token's bytes (may be part of a character)
    logprob: float


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    """The sampled token's log-probability and the ``top`` most likely at that step."""

    token: int
    piece: bytes
    logprob: float
    top: list[TopLogprob]


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """``(log p(token), [(id, log p)] of the k most likely, best first)`` from one row of logits."""
    x = logits.astype(np.float64, copy=False)
    finite = np.isfinite(x)
    m = float(x[finite].max()) if finite.any() else 0.0
    lse = m + float(np.log(np.exp(x[finite] - m).sum())) if finite.any() else 0.0
    chosen = float(x[token]) - lse if finite[token] else float("-inf")
    if k <= 0:
        return chosen, []
    k = min(k, x.shape[0])
    best = np.argpartition(-x, k - 1)[:k]
    best = best[np.argsort(-x[best], kind="stable")]
    return chosen, [(int(i), float(x[i]) - lse) for i in best if finite[i]]
