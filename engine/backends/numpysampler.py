"""Token sampling in numpy, for runtimes that return logits and have no sampler of their own.

The ONNX decoder backend (:mod:`engine.backends.onnxrt`) gets a row of logits
per sequence from onnxruntime and picks the next token here: greedy argmax
when the request asks for it, otherwise the repeat penalty over the last
:data:`PENALTY_LAST_N` tokens, then top-k, temperature, min-p and top-p, and
a draw from the request's seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.requests import SamplingParams

__all__ = ["PENALTY_LAST_N", "sample_token"]

PENALTY_LAST_N = 64


def sample_token(
    logits: np.ndarray,
    sampling: SamplingParams,
    history: Sequence[int],
    rng: np.random.Generator | None,
) -> int:
    """The next token from one row of ``logits`` given the tokens so far (``history``).

    ``rng`` is None for greedy requests (temperature 0), which take the argmax
    after the repeat penalty.
    """
    s = sampling
    if s.temperature == 0.0 and s.repeat_penalty == 1.0:
        return int(logits.argmax())
    x = logits.astype(np.float64, copy=True)
    if s.repeat_penalty != 1.0 and history:
        recent = np.unique(np.array(history[-PENALTY_LAST_N:], dtype=np.int64))
        vals = x[recent]
        x[recent] = np.where(vals > 0, vals / s.repeat_penalty, vals * s.repeat_penalty)
    if s.temperature == 0.0 or rng is None:
        return int(x.argmax())
    return _draw(x, s, rng)


def _draw(x: np.ndarray, s: SamplingParams, rng: np.random.Generator) -> int:
    order = np.argsort(-x)
    if s.top_k > 0:
        order = order[: s.top_k]
    z = x[order] / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.min_p > 0.0:
        keep = p >= s.min_p * p[0]
        order, p = order[keep], p[keep] / p[keep].sum()
    if s.top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        order, p = order[:cut], p[:cut] / p[:cut].sum()
    return int(order[rng.choice(len(order), p=p)])
