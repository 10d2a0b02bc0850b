"""Each sequence's next token, chosen from the logits a llama.cpp step left for it.

Kept apart from :mod:`engine.backends.llamacpp`, which plans and runs the
steps: this is the one place that turns a row of logits into a token, and the
ways it can refuse to (a grammar that allows nothing).

Greedy requests (temperature 0) take an argmax over the logits with numpy,
after dividing the logits of recent tokens by the repeat penalty as
llama.cpp's penalty sampler does: a sampler chain per sequence cost ~0.3 ms a
token, 6 % of a 16-stream step. The rest, and structured output (grammars),
use llama.cpp's samplers (:mod:`engine.backends.llamasampling`). A tool-call
grammar run by llguidance masks the row before either.
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from engine.backends.llamasampling import Samplers
from engine.backends.llamaseq import SeqState
from engine.logprobs import token_logprobs
from protocol.errors import BadRequest

__all__ = ["Logprobs", "pick"]

Logprobs = tuple[float, list[tuple[int, float]]]


def _row(ctx: object, idx: int, n_vocab: int) -> np.ndarray:
    """The step's logits for batch position ``idx``: a view, not a copy."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(n_vocab,))


def pick(
    ctx: object, idx: int, st: SeqState, samplers: Samplers, n_vocab: int
) -> tuple[int, Logprobs | None]:
    """The next token of ``st`` from the logits at ``idx``, with its logprobs when asked.

    Raises BadRequest when its grammar allows no token of the vocabulary (the
    sequence cannot go on; others in the step are not affected).
    """
    if st.guide is not None and not st.guide.mask(_row(ctx, idx, n_vocab)):
        raise BadRequest(
            f"the output cannot continue its grammar: {st.guide.error() or 'no token fits'}"
        )
    if st.sampler is None:
        logits = _row(ctx, idx, n_vocab)
        if st.ban_eog:
            logits[samplers.end_tokens()] = -np.inf
        if st.penalty != 1.0:
            seen = np.fromiter(set(st.recent), dtype=np.intp)
            vals = logits[seen]
            logits[seen] = np.where(vals <= 0, vals * st.penalty, vals / st.penalty)
            token = int(logits.argmax())
            st.recent.append(token)
        else:
            token = int(logits.argmax())
    elif st.constrained:
        logits = _row(ctx, idx, n_vocab)
        sampled = (
            samplers.greedy_grammar(st.sampler, logits)
            if st.greedy_grammar
            else samplers.sample_checked(st.sampler, logits)
        )
        if sampled is None:
            raise BadRequest(
                "the grammar allows no token of this model's vocabulary here "
                "(does it require a character the vocabulary cannot spell, such as NUL?)"
            )
        token = sampled
    else:
        token = int(llama_cpp.llama_sampler_sample(st.sampler, ctx, idx))
    # The row as the choice saw it (an end token banned, penalties applied).
    lps = (
        None if st.logprobs is None else token_logprobs(_row(ctx, idx, n_vocab), token, st.logprobs)
    )
    if st.guide is not None and not st.guide.accept(token):
        raise BadRequest(f"the grammar refused a token: {st.guide.error()}")
    return token, lps
