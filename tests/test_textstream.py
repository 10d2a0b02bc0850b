"""UTF-8 reassembly and stop sequences, on literal bytes."""

from __future__ import annotations

from engine.textstream import TextStream


def feed_all(ts: TextStream, chunks: list[bytes]) -> list[str]:
    out = [ts.feed(c) for c in chunks]
    out.append(ts.flush())
    return out


def test_character_split_across_tokens_is_released_whole() -> None:
    ts = TextStream()
    assert feed_all(ts, [b"a", b"\xe4", b"\xbd", b"\xa0", b"b"]) == ["a", "", "", "你", "b", ""]


def test_four_byte_character_and_invalid_bytes() -> None:
    ts = TextStream()
    out = feed_all(ts, [b"\xf0\x9f", b"\x99\x82", b"\xff", b"\xe4"])
    assert out[:2] == ["", "🙂"]
    assert "".join(out) == "🙂\ufffd\ufffd"  # never-completing bytes become U+FFFD


def test_stop_sequence_split_across_tokens_is_caught_and_not_leaked() -> None:
    ts = TextStream(["Observer:"])
    out = [ts.feed(c) for c in [b"Hello ", b"Obs", b"erv", b"er: more"]]
    assert "".join(out) == "Hello "
    assert ts.stopped
    assert ts.feed(b"anything") == ""


def test_held_prefix_is_released_when_it_does_not_complete() -> None:
    ts = TextStream(["STOP"])
    assert ts.feed(b"ab ST") == "ab "
    assert ts.feed(b"OR") == "STOR"
    assert ts.feed(b"ST") == ""
    assert ts.flush() == "ST"
    assert not ts.stopped


def test_earliest_of_several_stop_sequences_wins() -> None:
    ts = TextStream(["world", "lo w"])
    assert ts.feed(b"hello world") == "hel"
    assert ts.stopped


def test_stop_sequence_inside_a_multibyte_run() -> None:
    ts = TextStream(["你🙂"])
    out = [ts.feed(c) for c in [b"x\xe4\xbd", b"\xa0\xf0\x9f\x99", b"\x82y"]]
    assert "".join(out) == "x"
    assert ts.stopped
