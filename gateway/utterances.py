"""Where speech starts and ends, and which words of a growing transcript are settled.

Pure decisions for WebSocket voice (:mod:`gateway.listening`), tested
without models or sockets:

* :class:`Endpointer` turns voice-activity probabilities, one per 32 ms
  window, into the start and the end of each utterance. Speech must last
  ``min_speech_ms`` to open one (a click or a cough does not) and silence
  ``silence_ms`` to close it; two thresholds (a lower one to stay in speech)
  keep a word's quiet tail from ending it early. A shorter quiet
  (``pause_ms``) is reported as a pause, so the work an end starts can start
  then, and be dropped if the speaker goes on (``resume``).
* :class:`SettledWords` is local agreement over successive transcripts of the
  same growing audio: a word is settled once two transcripts in a row agree
  on it and everything before it. Settled words are never revised: the
  final transcript of the utterance starts with them, so a client may show
  them as firm while the rest still changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "WINDOW_MS",
    "EndpointSettings",
    "Endpointer",
    "SettledWords",
    "without_overlap",
    "words_of",
]

WINDOW_MS = 32  # the voice-activity model's window: 512 samples at 16 kHz

# "pause": speech went quiet for ``pause_ms`` (it may be ending: work on the utterance
# may start early); "resume": it went on after a pause (that work is void).
Edge = Literal["start", "end", "pause", "resume"]


@dataclass(frozen=True)
class EndpointSettings:
    """How speech is told from silence (the ``vad`` options of ``listen``)."""

    threshold: float = 0.5  # a window at or above this probability is speech
    min_speech_ms: int = 96  # speech this long opens an utterance
    silence_ms: int = 400  # silence this long closes it
    pad_ms: int = 192  # audio kept from before the start (the first syllable's onset)
    max_utterance_s: float = 30.0  # an utterance this long is closed where it is
    pause_ms: int = 160  # quiet this long while speaking: a "pause" (the end may be near)

    @property
    def low(self) -> float:
        """Below this a window is silence; between the two, the current state holds."""
        return max(0.01, self.threshold - 0.15)


@dataclass
class Endpointer:
    """Utterance edges from voice-activity probabilities, one window at a time."""

    settings: EndpointSettings = field(default_factory=EndpointSettings)
    speaking: bool = False
    cut: bool = False  # the last utterance ended at the length limit, not in silence
    window: int = 0  # windows seen
    _run: int = 0  # consecutive windows against the current state
    _length: int = 0  # windows in the current utterance
    _silent: int = 0  # windows of silence that ended the last utterance

    def feed(self, probability: float) -> Edge | None:
        """The edge this window makes, if any. A start is dated ``min_speech_ms`` back
        (:meth:`start_window`), an end ``silence_ms`` back (:meth:`end_window`)."""
        s = self.settings
        self.window += 1
        if not self.speaking:
            self._run = self._run + 1 if probability >= s.threshold else 0
            if self._run * WINDOW_MS >= s.min_speech_ms:
                self.speaking, self._length = True, self._run
                self._run = 0
                return "start"
            return None
        self._length += 1
        quiet = self._run
        self._run = self._run + 1 if probability < s.low else 0
        pause = min(s.pause_ms, s.silence_ms)
        if self._run == 0 and quiet * WINDOW_MS >= pause:
            return "resume"
        silent = self._run * WINDOW_MS >= s.silence_ms
        self.cut = not silent and self._length * WINDOW_MS >= s.max_utterance_s * 1000
        if silent or self.cut:
            self.speaking = False
            self._silent = self._run if silent else 0
            self._run = self._length = 0
            return "end"
        if self._run * WINDOW_MS >= pause > (self._run - 1) * WINDOW_MS:
            return "pause"
        return None

    def start_window(self) -> int:
        """The window where the utterance that just started began (pad included)."""
        back = self.settings.min_speech_ms // WINDOW_MS + self.settings.pad_ms // WINDOW_MS
        return max(0, self.window - back)

    def trailing(self) -> int:
        """Windows of silence at the end of the utterance that just ended (none when cut)."""
        return self._silent


_WORD = re.compile(r"\S+")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def _key(word: str) -> str:
    """A word as agreement compares it: case and surrounding punctuation ignored."""
    return re.sub(r"^\W+|\W+$", "", word.lower())


@dataclass
class SettledWords:
    """Words of an utterance that no later transcript may change (local agreement of two)."""

    settled: list[str] = field(default_factory=list)
    _last: list[str] = field(default_factory=list)

    def update(self, hypothesis: str) -> tuple[str, str]:
        """Take a transcript of the utterance so far: (settled text, whole text).

        The whole text is the settled words, then the hypothesis' words past
        them: it never contradicts what was settled before.
        """
        words = words_of(hypothesis)
        n = len(self.settled)
        agreed = n
        while (
            agreed < len(words)
            and agreed < len(self._last)
            and _key(words[agreed]) == _key(self._last[agreed])
        ):
            agreed += 1
        # Grow only where this transcript also agrees with what was settled.
        if [_key(w) for w in words[:n]] == [_key(w) for w in self.settled]:
            self.settled.extend(words[n:agreed])
        self._last = words
        return " ".join(self.settled), self.whole(words)

    def whole(self, words: list[str]) -> str:
        return " ".join([*self.settled, *words[len(self.settled) :]])

    def final(self, transcript: str) -> str:
        """The utterance's last word: the settled words, then the final transcript's past them."""
        return self.whole(words_of(transcript))


def without_overlap(before: str, text: str, most: int = 8) -> str:
    """``text`` without its first words that repeat the last words of ``before``.

    An utterance cut at the length limit goes on in the next one, whose audio
    starts a little before the cut (so no word is split): the words heard twice
    are said once.
    """
    tail = [_key(w) for w in words_of(before)[-most:]]
    words = words_of(text)
    keys = [_key(w) for w in words]
    for n in range(min(len(tail), len(words)), 0, -1):
        if tail[-n:] == keys[:n]:
            return " ".join(words[n:])
    return text
