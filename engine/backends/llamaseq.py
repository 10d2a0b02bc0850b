"""What the llama.cpp backend keeps for each sequence between steps.

Kept apart from :mod:`engine.backends.llamacpp` (which builds and runs the
steps) so the step code reads as what it does with these fields.
"""

from __future__ import annotations

from collections import deque

from engine.backends.llamalora import LoraKey
from engine.backends.llamasampling import PENALTY_LAST_N
from engine.backends.llamaslots import Slot
from engine.guidance import Guide

__all__ = ["SeqState"]


class SeqState:
    """One sequence in a llama.cpp context: its window, what it still has to feed, how it samples."""

    __slots__ = (
        "ban_eog",
        "cache_key",
        "constrained",
        "decoding",
        "greedy_grammar",
        "guide",
        "logprobs",
        "lora",
        "n_past",
        "passed",
        "penalty",
        "pending",
        "priority",
        "recent",
        "reused",
        "sampler",
        "slot",
        "suspended",
        "tokens",
        "urgent",
    )

    def __init__(
        self,
        slot: Slot,
        pending: list[int],
        n_past: int,
        sampler: object | None,
        constrained: bool = False,
        greedy_grammar: bool = False,
        priority: int = 0,
        guide: Guide | None = None,
    ) -> None:
        self.priority = priority
        self.ban_eog = False  # ignore_eos: end-of-generation tokens are never chosen
        self.lora: LoraKey = ()  # the adapters it runs under (engine.backends.llamalora)
        # What its slot's cache is computed under (Slot.lora): its adapters, and for a
        # prompt with images a key of its own (images are not matched token by token).
        self.cache_key: LoraKey = ()
        # A grammar run by llguidance (tool calls): masks the logits before sampling.
        self.guide = guide
        self.logprobs: int | None = None  # alternatives wanted with each token's logprob
        self.reused = 0  # prompt tokens taken from the slot's cache
        self.urgent = False  # paused another sequence to start: its prompt goes first
        self.suspended = False
        self.tokens: list[int] = []  # while suspended: what it had read, then its pending
        # The greedy path's repeat penalty, over the last PENALTY_LAST_N tokens
        # (prompt included), as llama.cpp's penalty sampler keeps them.
        self.penalty = 1.0
        self.recent: deque[int] = deque(maxlen=PENALTY_LAST_N)
        self.decoding = False  # has sampled a token: ``pending`` is that token
        self.passed = 0  # steps in a row it wanted prompt tokens and got none
        self.constrained = constrained  # the sampler chain starts with a grammar
        # Greedy under a grammar: ``sampler`` is the grammar alone, checked against the
        # argmax first (see LlamaCppBackend._greedy_grammar).
        self.greedy_grammar = greedy_grammar
        self.slot = slot
        self.pending = (
            pending  # tokens to feed: the prompt's unread part, then the last sampled token
        )
        self.n_past = n_past
        self.sampler = sampler  # llama_sampler pointer, or None for the greedy fast path
