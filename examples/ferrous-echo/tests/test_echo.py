"""The example plugin's own tests: its entry is found through the entry-point group, and
its backend echoes, several sequences at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from ferrous_echo import EOS, EchoBackend, EchoEntry

from engine.backends.base import LoadParams
from engine.backends.registry import find_entry, plugins
from engine.requests import SamplingParams
from protocol.errors import ModelLoadError


def test_the_entry_point_gives_the_echo_entry() -> None:
    [plugin] = [p for p in plugins() if p.distribution == "ferrous-echo"]
    assert plugin.error == "" and [type(e) for e in plugin.entries] == [EchoEntry]


def test_two_sequences_echo_their_prompts_after_the_prefix(tmp_path: Path) -> None:
    model = tmp_path / "m.echo"
    model.write_text("> ")
    entry = find_entry(str(model))
    assert isinstance(entry, EchoEntry)
    backend = entry.backend_class().load(str(model), LoadParams())
    assert isinstance(backend, EchoBackend)
    greedy = SamplingParams(temperature=0)
    backend.start(1, backend.tokenize("hi"), greedy)
    backend.start(2, backend.tokenize("héllo"), greedy)
    got: dict[int, list[int]] = {1: [], 2: []}
    while True:
        step = backend.step([1, 2])
        if not step:
            break
        for seq, token in step.items():
            got[seq].append(token)
    assert got[1][-1] == EOS and backend.detokenize(got[1]).decode() == "> hi"
    assert backend.detokenize(got[2]).decode() == "> héllo"


def test_a_bad_file_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        EchoEntry().inspect(str(tmp_path / "missing.echo"))
