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

    def encode(self, msg: ServerMessage | ClientMessage) -> bytes:
        return self._enc.encode(msg)

    def decode_client(self, data: bytes | str) -> ClientMessage:
        try:
            return self._client_dec.decode(data)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid message: {exc}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(
                f"malformed {'MessagePack' if self.binary else 'JSON'}: {exc}"
            ) from None

    def decode_server(self, data: bytes | str) -> ServerMessage:
        try:
            return self._server_dec.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BadRequest(f"invalid server message: {exc}") from None


SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)
_codecs = {name: Codec(name) for name in SUBPROTOCOLS}


def codec_for(subprotocol: str) -> Codec:
    return _codecs[subprotocol]
