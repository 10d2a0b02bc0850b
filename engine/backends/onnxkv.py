"""Where the ONNX decoder backend keeps keys and values (:mod:`engine.backends.onnxrt`).

Three pieces, kept apart from the decode loop because each has its own rules
and tests:

* :class:`SeqState`, one sequence's state: the tokens still to feed, those
  already in its cache, and (in copied mode) its own keys and values;
* :class:`PrefixStore`, keys and values of finished sequences kept within a
  byte budget, so a later prompt starting the same way copies them instead of
  reading that part again;
* :class:`SharedKV`, the one buffer per layer and kind that graphs with
  ``GroupQueryAttention`` append to in place (shared-buffer mode).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from engine.guidance import Guide
from engine.requests import SamplingParams

__all__ = ["INITIAL_CAPACITY", "PrefixStore", "SeqState", "SharedKV", "common_prefix"]

INITIAL_CAPACITY = 256  # KV positions per row before the shared buffer first grows


@dataclass
class SeqState:
    """One sequence of the ONNX backend."""

    pending: list[int]  # tokens to feed next: the prompt, then the last sampled token
    past: list[np.ndarray] = field(default_factory=list)  # per layer K, V: [kv, len, hd]
    n_past: int = 0
    history: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rng: np.random.Generator | None = None
    slot: int = -1  # its row in the shared KV buffer (shared-buffer graphs only)
    reused: int = 0  # prompt tokens copied from a cached prefix
    priority: int = 0
    urgent: bool = False  # it paused another to start: its prompt goes first (engine.stepplan)
    passed: int = 0  # steps in a row its prompt waited
    guide: Guide | None = None  # structured output or tool calls: masks its logits
    suspended: bool = False  # paused for another (engine.preemption); its cache is in ``past``

    @property
    def decoding(self) -> bool:
        return len(self.pending) == 1 and self.n_past > 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common leading part of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixStore:
    """Keys and values of finished sequences, least recently used dropped first beyond ``budget`` bytes.

    An entry holds the tokens a sequence had in its cache and, per layer and
    kind, a [kv_heads, n, head_dim] array of their keys or values. An entry
    whose tokens begin another's adds nothing and is not kept.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self._entries: OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, tokens: np.ndarray, kv: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in kv)
        if size > self.budget:
            return
        for key, (have, _) in list(self._entries.items()):
            common = common_prefix(tokens, have)
            if common == len(tokens):  # already covered by a longer entry
                self._entries.move_to_end(key)
                return
            if common == len(have):  # the new entry covers this one
                self._drop(key)
        while self._entries and self.bytes + size > self.budget:
            self._drop(next(iter(self._entries)))
        self._entries[self._next] = (tokens, kv)
        self._next += 1
        self.bytes += size

    def best(self, prompt: np.ndarray) -> tuple[int, list[np.ndarray] | None]:
        """(shared length, the entry's arrays) of the entry sharing most leading tokens with ``prompt``."""
        best_n, best_key = 0, None
        for key, (tokens, _) in self._entries.items():
            n = common_prefix(prompt, tokens)
            if n > best_n:
                best_n, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best_n, self._entries[best_key][1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: int) -> None:
        _, kv = self._entries.pop(key)
        self.bytes -= sum(a.nbytes for a in kv)


class SharedKV:
    """One KV buffer per layer and kind, [slots, kv_heads, capacity, head_dim], bound as past and present.

    Graphs with ``GroupQueryAttention`` (see :mod:`engine.onnx.fused`) append
    each run's keys and values in place when the same memory is bound as
    ``past_key_values.*`` and ``present.*``, so nothing is copied per token.
    A run covers a contiguous block of rows; sequences take the lowest free
    row, and when one leaves, the highest is moved into its row so decoding
    rows stay packed at the top. Capacity starts small and doubles (up to
    ``n_ctx``) as sequences grow, so memory follows the longest sequence
    rather than the context limit.
    """

    def __init__(
        self,
        slots: int,
        n_layer: int,
        kv_heads: int,
        head_dim: int,
        n_ctx: int,
        vocab: int | None = None,
    ) -> None:
        self.slots = slots
        self.n_ctx = n_ctx
        self._shape = (kv_heads, head_dim)
        self._n = 2 * n_layer
        self.capacity = 0
        self.buffers: list[np.ndarray] = []
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self.owner: list[SeqState | None] = [None] * slots
        # Graphs whose logits are [batch, 1, vocab] (the LM head on the last position only)
        # write them into this buffer: no output objects to fetch and wrap per step.
        self.logits = np.zeros((slots, 1, vocab), dtype=np.float32) if vocab is not None else None
        self.reserve(min(n_ctx, INITIAL_CAPACITY))

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per row (doubling, at most ``n_ctx``)."""
        if length <= self.capacity:
            return
        if length > self.n_ctx:
            raise RuntimeError(f"{length} positions exceed the context of {self.n_ctx}")
        cap = max(self.capacity, 1)
        while cap < length:
            cap *= 2
        cap = min(cap, self.n_ctx)
        kv, hd = self._shape
        grown = [np.zeros((self.slots, kv, cap, hd), dtype=np.float32) for _ in range(self._n)]
        for new, old in zip(grown, self.buffers, strict=False):
            new[:, :, : self.capacity] = old
        self.buffers, self.capacity = grown, cap
        self._bindings.clear()

    def binding(
        self,
        session: ort.InferenceSession,
        past: list[str],
        present: list[str],
        first: int,
        rows: int,
    ) -> ort.IOBinding:
        """An IOBinding with rows ``first .. first+rows-1`` of every buffer bound as past and present.

        Built once per row block and capacity (the buffers are views, not
        copies); the caller binds the step's inputs and ``logits`` on it.
        """
        key = (first, rows)
        io = self._bindings.get(key)
        if io is None:
            io = session.io_binding()
            if self.logits is not None:
                view = ort.OrtValue.ortvalue_from_numpy(self.logits[first : first + rows])
                io.bind_ortvalue_output("logits", view)
            else:
                io.bind_output("logits", "cpu")  # first: outputs come back in binding order
            for name_in, name_out, buf in zip(past, present, self.buffers, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buf[first : first + rows])
                io.bind_ortvalue_input(name_in, value)
                io.bind_ortvalue_output(name_out, value)
            self._bindings[key] = io
        return io

    def take(self, seq: SeqState) -> None:
        row = self.owner.index(None)
        self.owner[row] = seq
        seq.slot = row

    def release(self, seq: SeqState) -> None:
        """Free ``seq``'s row; the highest occupied row moves into it (its used part only)."""
        row = seq.slot
        if row < 0 or self.owner[row] is not seq:
            return
        self.owner[row] = None
        seq.slot = -1
        top = max((i for i, o in enumerate(self.owner) if o is not None), default=-1)
        if top > row:
            moved = self.owner[top]
            assert moved is not None
            n = moved.n_past
            for b in self.buffers:
                b[row, :, :n] = b[top, :, :n]
            self.owner[row], self.owner[top] = moved, None
            moved.slot = row

    def used_rows(self) -> int:
        return 1 + max((i for i, o in enumerate(self.owner) if o is not None), default=-1)
