"""The pure decisions of WebSocket voice: utterance edges, settled words, sentence cuts.

No models and no sockets: probabilities and transcripts are given, the
decisions are checked (the real-model tests are in test_voice_ws.py).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.sentences import Sentences, speakable
from gateway.utterances import (
    WINDOW_MS,
    Endpointer,
    EndpointSettings,
    SettledWords,
    without_overlap,
    words_of,
)


def _edges(e: Endpointer, probabilities: list[float]) -> list[tuple[int, str]]:
    out = []
    for p in probabilities:
        edge = e.feed(p)
        if edge:
            out.append((e.window, edge))
    return out


def test_speech_must_last_to_start_and_silence_must_last_to_end() -> None:
    s = EndpointSettings(min_speech_ms=96, silence_ms=320)
    e = Endpointer(s)
    # A 64 ms click is not speech; 96 ms of it is.
    assert _edges(e, [0.9, 0.9, 0.1, 0.1]) == []
    assert _edges(e, [0.9, 0.9, 0.9]) == [(7, "start")]
    # A word's quiet tail (between the thresholds) keeps the utterance open, and so
    # does a pause shorter than silence_ms; one of pause_ms (160) is reported, and
    # so is the speech going on after it.
    assert _edges(e, [0.4] * 20 + [0.1] * 9 + [0.9]) == [(32, "pause"), (37, "resume")]
    assert _edges(e, [0.1] * 9) == [(42, "pause")]
    assert _edges(e, [0.1]) == [(7 + 30 + 10, "end")]
    assert e.trailing() == 320 // WINDOW_MS and not e.cut
    assert e.start_window() == e.window - (96 + s.pad_ms) // WINDOW_MS


def test_an_utterance_at_the_length_limit_is_cut_there() -> None:
    e = Endpointer(EndpointSettings(max_utterance_s=1.0))
    edges = [x for x in _edges(e, [0.9] * 66) if x[1] in ("start", "end")]
    # Each utterance holds 32 windows (1024 ms), the 3 that started it included; the
    # next starts as soon as 3 more windows of speech have come.
    assert edges == [(3, "start"), (32, "end"), (35, "start"), (64, "end")]
    assert e.cut and e.trailing() == 0


def test_settled_words_grow_by_agreement_and_never_change() -> None:
    w = SettledWords()
    assert w.update("The quick") == ("", "The quick")
    assert w.update("The quick brown") == ("The quick", "The quick brown")
    # A transcript that disagrees with settled words cannot revise them.
    assert w.update("A quack brown fox") == ("The quick", "The quick brown fox")
    assert w.update("The quick brown fox jumps") == (
        "The quick brown fox",
        "The quick brown fox jumps",
    )
    # Case and punctuation do not break agreement; the final keeps the settled words.
    assert w.update("the quick brown fox, jumps over") == (
        "The quick brown fox jumps",
        "The quick brown fox jumps over",
    )
    assert w.final("The quick brown fox jumped over the dog.") == (
        "The quick brown fox jumps over the dog."
    )


@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "A,", "b."]), max_size=8), max_size=8))
def test_settled_text_only_ever_grows_and_every_text_starts_with_it(
    hypotheses: list[list[str]],
) -> None:
    w = SettledWords()
    before: list[str] = []
    for words in hypotheses:
        settled, whole = w.update(" ".join(words))
        assert words_of(settled)[: len(before)] == before
        assert words_of(whole)[: len(words_of(settled))] == words_of(settled)
        before = words_of(settled)
    assert words_of(w.final("c c c"))[: len(before)] == before


def test_words_heard_twice_across_a_cut_are_said_once() -> None:
    assert without_overlap("and then we went to the", "to the market early") == "market early"
    assert without_overlap("one two three", "four five") == "four five"
    assert without_overlap("", "four five") == "four five"


def test_sentences_come_out_as_soon_as_they_end() -> None:
    s = Sentences()
    out: list[str] = []
    for piece in ["Hel", "lo", " there", ".", " How", " are you?", " I", " am", " fine"]:
        out += s.feed(piece)
    assert out == ["Hello there.", "How are you?"]
    assert s.flush() == ["I am fine"]
    assert s.flush() == []


def test_the_first_piece_may_end_at_a_clause_and_long_ones_are_cut() -> None:
    s = Sentences(first_clause_chars=20, first_max_chars=100, max_chars=60)
    assert s.feed("Well, that is a fine question, ") == ["Well, that is a fine question,"]
    # Only the first piece ends at a clause.
    assert s.feed("and here, again, ") == []
    long = "word " * 30
    pieces = s.feed(long)
    assert pieces and all(len(p) <= 60 for p in pieces)
    # Decimal points are not sentence ends.
    t = Sentences()
    assert t.feed("Pi is 3.14 and e is 2.72. ") == ["Pi is 3.14 and e is 2.72."]
    # A long first sentence is cut at a word past first_max_chars, the next ones are not.
    u = Sentences(first_max_chars=20)
    assert u.feed("The capital city of the country is Paris") == ["The capital city of"]
    assert u.feed(" and it is a big and busy place") == []


def test_what_is_spoken_leaves_out_markdown_code_and_links() -> None:
    text = "## Title\n**Bold** and `code` see https://example.com/x ```py\nprint(1)\n``` done"
    assert speakable(text) == "Title Bold and code see done"


def test_a_live_decode_that_starts_over_is_cut_there() -> None:
    from engine.backends.whisper import without_loop

    text = " Green Apple sit on the kitchen table. Green Apple sit On the"
    assert without_loop(text) == " Green Apple sit on the kitchen table."
    assert without_loop(" The quick brown fox.") == " The quick brown fox."
