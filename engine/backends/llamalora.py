"""LoRA adapters on one loaded llama.cpp model: loaded once, applied per step.

llama.cpp applies adapters to a whole context, not to a sequence: every
token of one ``llama_decode`` is computed with the same set. Sequences asking
for different sets (or none) still share the base model and its context:
each step decodes the sequences of one set (:func:`step_group`, turn by turn
between sets), and switches the context's adapters first when the set differs
from the last (``llama_set_adapters_lora`` is a no-op for the same set).

A slot's cached tokens were computed under one set; they are only reused by a
sequence asking for the same (``Slot.lora``), since an adapter on the
attention projections changes the cached keys and values themselves.

Adapter files are loaded on first use and kept while any sequence uses them,
at most :data:`MAX_LOADED` (the least recently used idle ones are freed).
"""

from __future__ import annotations

import ctypes
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import llama_cpp

from engine.requests import Adapter
from protocol.errors import BadRequest

__all__ = ["MAX_LOADED", "LoraKey", "LoraSets", "lora_key", "step_group"]

MAX_LOADED = 8  # adapter files kept loaded per model
_FAILURE = re.compile(r"error|fail|mismatch|incorrect|invalid|expect", re.IGNORECASE)

LoraKey = tuple[tuple[str, float], ...]


def lora_key(adapters: Iterable[Adapter]) -> LoraKey:
    """The set as a comparable key: each file once (scales of a repeated file add),
    in the order given; a zero scale is no adapter."""
    scales: dict[str, float] = {}
    for a in adapters:
        scales[a.path] = scales.get(a.path, 0.0) + a.scale
    return tuple((path, scale) for path, scale in scales.items() if scale != 0.0)


def step_group(keys: Sequence[LoraKey], turn: int) -> LoraKey:
    """The set whose sequences run this step: ``keys`` are the running sequences' sets
    (in their order), and each distinct set has its turn in the order first seen."""
    distinct = list(dict.fromkeys(keys))
    return distinct[turn % len(distinct)]


class LoraSets:
    """The adapters loaded on one model and the set its context applies (see the module)."""

    def __init__(self, model: object, ctx: object, capture: Callable[..., tuple[object, str]]):
        self._model = model
        self._ctx = ctx
        self._capture = capture
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._active: LoraKey = ()
        self.turn = 0

    def load(self, key: LoraKey, in_use: Iterable[LoraKey]) -> None:
        """Make sure every file of ``key`` is loaded; BadRequest naming a file llama.cpp
        refuses (not a LoRA, or made for another model)."""
        for path, _ in key:
            if path in self._loaded:
                self._loaded.move_to_end(path)
                continue
            busy = {p for k in (*in_use, key) for p, _ in k}
            for old in [p for p in self._loaded if p not in busy]:
                if len(self._loaded) < MAX_LOADED:
                    break
                llama_cpp.llama_adapter_lora_free(self._loaded.pop(old))
            adapter, said = self._capture(
                lambda path=path: llama_cpp.llama_adapter_lora_init(self._model, path.encode()),
                _FAILURE.search,
            )
            if not adapter:
                # llama.cpp's words on what failed, without the server's paths in them.
                reason = re.sub(r"/[^\s'\"]+", "<file>", said) or "llama.cpp could not read it"
                raise BadRequest(f"the adapter does not fit this model: {reason}")
            self._loaded[path] = adapter

    def apply(self, key: LoraKey) -> None:
        """Set the context's adapters to ``key`` (nothing to do when they are)."""
        if key == self._active:
            return
        n = len(key)
        ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))()
        for i, (path, _) in enumerate(key):
            ptrs[i] = cast(Any, self._loaded[path])
        scales = (ctypes.c_float * max(n, 1))(*(s for _, s in key))
        rc = llama_cpp.llama_set_adapters_lora(
            self._ctx, ptrs if n else None, n, scales if n else None
        )
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")
        self._active = key

    def free(self) -> None:
        """Detach and free every adapter (before the model is freed)."""
        if self._loaded:
            self.apply(())
        while self._loaded:
            llama_cpp.llama_adapter_lora_free(self._loaded.popitem()[1])
