"""An example backend plugin: a text "model" that answers its prefix and the prompt.

A model is a text file ending in ``.echo``; its content is the prefix. Tokens
are bytes (0-255), with 256 as the start and 257 as the end of a text, so the
answer is the prompt's bytes back, one per step, after the prefix, then the
end. Several sequences step together, as a real backend's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.backends.base import Backend, LoadParams, TextGenerator
from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.requests import SamplingParams
from protocol.errors import ModelLoadError

__all__ = ["EchoBackend", "EchoEntry"]

BOS, EOS = 256, 257
MAX_PREFIX = 4096


class EchoEntry(BackendEntry):
    name = "echo"
    package = "ferrous_echo"
    module = "ferrous_echo"
    cls = "EchoBackend"
    kinds = frozenset({Kind.TEXT})
    layout = "a .echo text file (its content is the answer's prefix)"

    def claims(self, path: str) -> bool:
        return path.endswith(".echo")

    def inspect(self, path: str) -> Found:
        file = Path(path)
        if not file.is_file() or file.suffix != ".echo":
            raise ModelLoadError(path, "not_echo", "an echo model is a .echo text file")
        if file.stat().st_size > MAX_PREFIX:
            raise ModelLoadError(path, "too_large", f"the prefix is over {MAX_PREFIX} bytes")
        return Found(path, self.name, frozenset({Kind.TEXT}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        return Sizing(8, inputs.workers * 1024 * 1024)


class EchoBackend(TextGenerator):
    name = "echo"
    max_sequences = 8
    chat_template = None
    bos_text = ""
    eos_text = ""

    def __init__(self, prefix: bytes, n_ctx: int) -> None:
        self._prefix = prefix
        self.n_ctx = n_ctx
        self._todo: dict[int, list[int]] = {}
        self._used: dict[int, int] = {}

    @classmethod
    def load(cls, path: str, params: LoadParams) -> Backend:
        try:
            prefix = Path(path).read_bytes()[:MAX_PREFIX]
        except OSError as exc:
            raise ModelLoadError(path, "missing", str(exc)) from None
        return cls(prefix, params.n_ctx or 4096)

    def free(self) -> None:
        self._todo.clear()

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return ([BOS] if add_bos else []) + list(text.encode())

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return bytes(t for t in tokens if t < 256)

    def is_end(self, token: int) -> bool:
        return token == EOS

    def start(
        self,
        seq: int,
        prompt: list[int],
        sampling: SamplingParams,
        priority: int = 0,
        urgent: bool = False,
    ) -> None:
        said = [t for t in prompt if t < 256]
        self._todo[seq] = [*self._prefix, *said, EOS]
        self._used[seq] = len(prompt)

    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        out = {}
        for seq in seqs:
            todo = self._todo.get(seq)
            if todo:
                out[seq] = todo.pop(0)
                self._used[seq] += 1
        return out

    def context_used(self, seq: int) -> int:
        return self._used.get(seq, 0)

    def finish(self, seq: int) -> None:
        self._todo.pop(seq, None)
        self._used.pop(seq, None)
