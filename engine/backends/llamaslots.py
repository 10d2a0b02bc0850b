"""Which slot a new sequence takes, and how much of its prompt a slot's cache already holds.

Pure decisions over token lists (no llama.cpp here): the llama.cpp backend
keeps one :class:`Slot` per sequence window and asks these functions where a
prompt goes and what it can skip reading.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "BORROW_MIN",
    "BORROW_SPAN",
    "PARK_MIN",
    "REUSE_MIN",
    "SHARE_MIN",
    "Slot",
    "common_prefix",
    "park_target",
    "pick_slot",
    "spliced",
]


class Slot:
    __slots__ = ("ahead", "ahead_at", "ahead_tries", "busy", "history", "index", "lora", "used")

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = False
        self.used = 0  # when a sequence last started here (a counter): older caches go first
        self.history: list[int] = []  # tokens whose KV this slot holds, positions 0..n-1
        # Tokens a finished chat's next turn will begin with, to read while the worker
        # is idle (engine.readahead); valid while ``history`` still has ``ahead_at``
        # tokens and no sequence holds the slot.
        self.ahead: list[int] = []
        self.ahead_at = 0
        self.ahead_tries = 0  # reads of ``ahead`` stopped so far
        # The LoRA adapters (files and scales) ``history`` was computed under: its
        # cache serves only sequences with the same (engine.backends.llamalora).
        self.lora: tuple[tuple[str, float], ...] = ()


# A free slot whose cached prefix saves at least this many prompt tokens is worth
# taking over the lowest free one (see pick_slot).
REUSE_MIN = 64
# A prompt sharing fewer tokens than this with every cache is unrelated to them.
SHARE_MIN = 16
# A cache about to be overwritten moves to a free slot when it holds at least this
# many tokens the new prompt will not keep (see park_target): reading 16 tokens
# again costs ~50 ms on two cores, moving them well under a millisecond.
PARK_MIN = 16


# Copy another slot's cache when it holds at least this many more prompt tokens
# than the chosen slot (see LlamaCppBackend._borrow), and is at most BORROW_SPAN
# times as long as what it shares.
BORROW_MIN = 8
BORROW_SPAN = 64


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pick_slot(free: list[Slot], shared: list[int], unified: bool) -> Slot:
    """The slot a new sequence takes: the lowest free one, unless a cache says otherwise.

    With a window per sequence llama.cpp attends over the span of windows from
    the lowest to the highest slot in a step, used or not: eight streams in
    slots 0-7 decoded at 38 ms a step, the same eight spread over slots 0-14
    at 57-68 ms (SmolLM2, 2 threads); choosing each newcomer's slot by its
    longest shared prefix (a system prompt plus a word or two) cost ~10 % at 8
    streams. So streams are packed low, and a cached prefix must save
    ``REUSE_MIN`` tokens (a follow-up turn, a long shared context) to pull a
    sequence elsewhere. A prompt that shares under ``SHARE_MIN`` tokens with
    every cache (it is unrelated to them) takes the emptiest free slot instead,
    so that a finished conversation's history survives for its next turn. In
    one shared cache the place costs nothing and the longest prefix wins.
    """
    best = max(range(len(free)), key=lambda i: (shared[i], -free[i].index))
    if unified or shared[best] >= REUSE_MIN:
        return free[best]
    if shared[best] < SHARE_MIN:
        return min(free, key=lambda x: (len(x.history), x.index))
    return min(free, key=lambda x: x.index)


def park_target(
    slots: list[Slot], taken: Slot, keeps: int, prompt: list[int], held: set[int]
) -> Slot | None:
    """Where the cache of ``taken`` is moved before a new sequence overwrites it, if anywhere.

    New sequences are packed into the lowest free slots (:func:`pick_slot`),
    so without this every new chat would land in the slot the last one used
    and erase its history: two users taking turns would each read their whole
    conversation again at every turn (a 1,000-token history is seconds of
    reading on two cores, moving it ~10 ms). So when ``taken`` holds at least
    ``PARK_MIN`` tokens the new prompt will not keep (``keeps``) and no other
    slot holds them too, they move to a free slot: an empty one first, else
    the one whose cache started longest ago, provided that it is older than
    ``taken``'s and is no better start for this ``prompt`` than ``taken``.
    Higher slots first, so the low ones stay free for running sequences.
    ``held`` are the indices of slots kept for suspended sequences.
    """
    history = taken.history
    if len(history) - keeps < PARK_MIN:
        return None
    others = [s for s in slots if s is not taken]
    if any(common_prefix(s.history, history) + PARK_MIN > len(history) for s in others):
        return None  # already held elsewhere (a copy it was borrowed from, or lent to)
    candidates = [
        s
        for s in others
        if not s.busy and s.index not in held and common_prefix(s.history, prompt) <= keeps
    ]
    if not candidates:
        return None
    target = min(candidates, key=lambda s: (bool(s.history), s.used, -s.index))
    if target.history and target.used > taken.used:
        return None  # every other cache is newer than this one: this one goes
    return target


def spliced(
    history: list[int], prompt: list[int], spell: Callable[[int], bytes], n_ctx: int
) -> tuple[list[int], int]:
    """``prompt`` with a cached answer's own tokens where it spells the same text,
    and how many of its first tokens ``history`` (a slot's cache) holds.

    A conversation's next turn repeats the model's last answer as text, and
    tokenizing that text need not give back the tokens the model generated
    ("Paris" may have come out as "Par" + "is"): the prompt then parts from
    the slot's cache inside that answer, and everything after is read again
    (each turn slower than the last). Where the prompt, from the first
    differing token, spells exactly the bytes of the cached tokens, those
    tokens are used instead: the model sees what it said, and only the new
    turn is read. Token boundaries must meet; otherwise nothing changes.

    Control tokens (a template's ``<|im_end|>``) spell no bytes, so bytes
    cannot tell whether both sides hold one: the walk stops at the first,
    and the tokens after a splice count as cached only where they are equal
    (a finished chat's cache may already hold the template's next turn
    marker, engine.readahead).
    """
    same = common_prefix(history, prompt)
    if same == 0 or same >= len(history) or same >= len(prompt):
        return prompt, same
    cached = history[same:]
    # Spell both sides byte by byte; stop where they part. Wherever both have
    # spelled the same bytes so far and a token ends on each side, they meet.
    ours, theirs = bytearray(), bytearray()  # cached[:i], prompt[same:same + j]
    i = j = 0
    meet = (0, 0)
    while i < len(cached) and same + j < len(prompt):
        if len(ours) <= len(theirs):
            piece = spell(cached[i])
            start = len(ours)
            ours += piece
            i += 1
        else:
            piece = spell(prompt[same + j])
            start = len(theirs)
            theirs += piece
            j += 1
        if not piece:
            break
        end = min(len(ours), len(theirs))
        if ours[start:end] != theirs[start:end]:
            break
        if len(ours) == len(theirs):
            meet = (i, j)
    if meet == (0, 0):
        return prompt, same
    i, j = meet
    joined = history[: same + i] + prompt[same + j :]
    if len(joined) >= n_ctx:
        return prompt, same
    return joined, common_prefix(history, joined)
