"""Encoding and decoding protocol messages for each subprotocol. Pure: bytes in, messages out.

One codec per negotiated subprotocol: ``ferrous.v1.json`` carries UTF-8 JSON in
text frames, ``ferrous.v1.msgpack`` MessagePack in binary frames. Decoders are
built once per message union (msgspec compiles them). Anything that does not
decode into a valid message raises :class:`protocol.errors.BadRequest` whose
text names the offending field path (``$.options.max_tokens``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .errors import BadRequest
from .messages import (
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    ClientMessage,
    ServerMessage,
)

__all__ = ["SUBPROTOCOLS", "Codec", "codec_for"]


class Codec:
    """Encoders and decoders for one subprotocol (both directions, for server and clients)."""

    def __init__(self, subprotocol: str) -> None:
        self.subprotocol = subprotocol
        self.binary = subprotocol == SUBPROTOCOL_MSGPACK
        self.frame: Literal["text", "binary"] = "binary" if self.binary else "text"
        self._client_dec: (
            msgspec.json.Decoder[ClientMessage] | msgspec.msgpack.Decoder[ClientMessage]
        )
        self._server_dec: (
            msgspec.json.Decoder[ServerMessage] | msgspec.msgpack.Decoder[ServerMessage]
        )
        if self.binary:
            self._enc: msgspec.json.Encoder | msgspec.msgpack.Encoder = msgspec.msgpack.Encoder()
            self._client_dec = msgspec.msgpack.Decoder(ClientMessage)
            self._server_dec = msgspec.msgpack.Decoder(ServerMessage)
        else:
            self._enc = msgspec.json.Encoder()
            self._client_dec = msgspec.json.Decoder(ClientMessage)
            self._server_dec = msgspec.json.Decoder(ServerMessage)

    def encode(self, msg: ServerMessage | ClientMessage) -> bytes | str:
        """A frame payload: str for a text frame (JSON), bytes for a binary frame (MessagePack)."""
        data = self._enc.encode(msg)
        return data if self.binary else data.decode("utf-8")

    def _check_frame(self, data: bytes | str) -> None:
        # RFC 6455 frame types carry meaning here: text is JSON, binary is MessagePack.
        if self.binary and isinstance(data, str):
            raise BadRequest(f"text frame on {self.subprotocol}: send MessagePack in binary frames")
        if not self.binary and not isinstance(data, str):
            raise BadRequest(f"binary frame on {self.subprotocol}: send JSON in text frames")

    def decode_client(self, data: bytes | str) -> ClientMessage:
        """Decode a client message from a frame payload (str = text frame, bytes = binary)."""
        self._check_frame(data)
        try:
            return self._client_dec.decode(data)  # type: ignore[arg-type]  # checked above
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid message: {exc}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed {self._encoding_name}: {exc}") from None
        except RecursionError:  # free-form fields (a JSON schema) nested absurdly deep
            raise BadRequest("invalid message: nested too deeply") from None
        except UnicodeError as exc:
            # msgspec raises these itself, not as DecodeError: a MessagePack str that is not
            # UTF-8 (UnicodeDecodeError), or a text payload with lone surrogates
            # (UnicodeEncodeError; never from a WebSocket, whose text frames are UTF-8).
            raise BadRequest(f"malformed {self._encoding_name}: {_unicode_reason(exc)}") from None

    def decode_server(self, data: bytes | str) -> ServerMessage:
        """Decode a server message from a frame payload (str = text frame, bytes = binary)."""
        self._check_frame(data)
        try:
            return self._server_dec.decode(data)  # type: ignore[arg-type]  # checked above
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BadRequest(f"invalid server message: {exc}") from None
        except RecursionError:
            raise BadRequest("invalid server message: nested too deeply") from None
        except UnicodeError as exc:
            raise BadRequest(f"invalid server message: {_unicode_reason(exc)}") from None

    @property
    def _encoding_name(self) -> str:
        return "MessagePack" if self.binary else "JSON"


def _unicode_reason(exc: UnicodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a string is not valid UTF-8 ({exc.reason} at string byte {exc.start})"
    return "text is not valid Unicode (lone surrogate)"


SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)
_codecs = {name: Codec(name) for name in SUBPROTOCOLS}


def codec_for(subprotocol: str) -> Codec:
    return _codecs[subprotocol]
