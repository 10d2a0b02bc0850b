"""Voice on a :class:`ferrous_client.FerrousClient` session: listen streams and speech.

:meth:`FerrousClient.listen` opens a stream the application feeds with
16-bit mono PCM (:meth:`VoiceStream.send`); iterating it gives what the
server makes of the audio: ``speech`` edges, ``transcript`` partials and
finals, and with ``reply`` each spoken answer's ``started``, ``delta``
text, ``audio`` chunks and ``done`` (answers are generations
``<stream id>.<utterance>``). The iteration ends at the stream's own
``done``. :meth:`FerrousClient.speak` gives one text's speech the same way.

With flow control on, audio bytes count against the window like text and
are granted back as the application takes them from the iteration, so a
slow player pauses the server's synthesis rather than filling memory here.
Voice streams do not survive a resumed connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ferrous_client.errors import FerrousClientError
from ferrous_client.protocol import messages as m
from ferrous_client.wire import error_from_message, utf8_len

if TYPE_CHECKING:
    from ferrous_client.client import FerrousClient

__all__ = ["VoiceEvent", "VoiceStream"]

VoiceEvent = m.SpeechEdge | m.TranscriptEvent | m.Started | m.Delta | m.AudioOut | m.Done

_ROUTED = (m.SpeechEdge, m.TranscriptEvent, m.Started, m.Delta, m.AudioOut, m.Done, m.Error)


class VoiceStream:
    """A ``listen`` (or ``speak``) stream: send audio, iterate its events."""

    def __init__(self, client: FerrousClient, stream_id: str, *, listening: bool) -> None:
        self.id = stream_id
        self.listening = listening
        self.done: m.Done | None = None
        #: Final transcripts, one per utterance, in order.
        self.transcripts: list[str] = []
        #: The answer being spoken (its generation id), if any.
        self.answering: str | None = None
        self._client = client
        self._queue: asyncio.Queue[VoiceEvent | FerrousClientError] = asyncio.Queue()
        self._ended = False

    def owns(self, gen_id: str) -> bool:
        return gen_id == self.id or gen_id.startswith(self.id + ".")

    def _deliver(self, msg: m.ServerMessage) -> None:
        if isinstance(msg, m.Error):
            self._queue.put_nowait(error_from_message(msg))
            if msg.id == self.id:
                self._ended = True
            return
        assert isinstance(msg, VoiceEvent)
        if isinstance(msg, m.TranscriptEvent) and msg.final:
            self.transcripts.append(msg.text)
        elif isinstance(msg, m.Started) and msg.id != self.id:
            self.answering = msg.id
        elif isinstance(msg, m.Done):
            if msg.id == self.id:
                self.done = msg
                self._ended = True
            elif msg.id == self.answering:
                self.answering = None
        self._queue.put_nowait(msg)

    # -- audio in ---------------------------------------------------------------------------

    async def send(self, pcm: bytes) -> None:
        """Samples for the stream (16-bit little-endian mono at its rate), in as many
        frames as the server's frame limit needs."""
        limit = self._client.ready.limits.max_frame_bytes
        # Base64 (JSON) makes data 4/3 as long; keep room for the message around it.
        step = max(2, (limit - 512) * 3 // 4 // 2 * 2)
        for i in range(0, len(pcm), step):
            await self._client._send_message(m.Audio(id=self.id, data=pcm[i : i + step]))

    async def end(self) -> None:
        """No more audio: speech in progress is finished and transcribed, then the stream's
        ``done`` ends the iteration."""
        await self._client._send_message(m.Audio(id=self.id, end=True))

    async def cancel(self) -> None:
        """Close the stream now (its answer too): ``done`` with ``cancelled`` follows."""
        if not self._ended:
            await self._client._send_message(m.Cancel(self.id))

    async def interrupt(self) -> None:
        """Stop the answer being spoken, as speech over it would (barge-in)."""
        if self.answering is not None:
            await self._client._send_message(m.Cancel(self.answering))

    # -- events out -------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[VoiceEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[VoiceEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, FerrousClientError):
                raise item
            if isinstance(item, m.AudioOut):
                self._client._consumed(len(item.data))
            elif isinstance(item, m.Delta):
                self._client._consumed(utf8_len(item.text))
            yield item
            if isinstance(item, m.Done) and item.id == self.id:
                self._client._voice.pop(self.id, None)
                return

    async def audio(self) -> bytes:
        """Read to the end; the audio of every chunk, joined (``speak`` with ``pcm16``)."""
        return b"".join([x.data async for x in self if isinstance(x, m.AudioOut)])


def route(client: FerrousClient, msg: m.ServerMessage) -> bool:
    """Hand ``msg`` to the voice stream it belongs to; False when it is not a voice one's."""
    if not isinstance(msg, _ROUTED):
        return False
    gen_id = msg.id
    if gen_id is None:
        return False
    for stream in client._voice.values():
        if stream.owns(gen_id):
            if isinstance(msg, m.AudioOut) and client._window is not None:
                client._window.received(len(msg.data))
            elif isinstance(msg, m.Delta) and client._window is not None:
                client._window.received(utf8_len(msg.text))
            stream._deliver(msg)
            return True
    return False
