"""The pure protocol layer: round trips in both encodings, typed errors, a fresh schema."""

from __future__ import annotations

import msgspec
import pytest

from protocol import messages as m
from protocol.codec import codec_for
from protocol.errors import BadRequest, ErrorCode
from protocol.schema import SCHEMA_PATH, render_schema

SERVER_SAMPLES: list[m.ServerMessage] = [
    m.Ready(1, "ferrousforge", "0.1.0", "s-1", "alice", ["tiny"], m.Limits(1024, 4, 8192, 20.0)),
    m.Started("g1", "tiny", "c-1"),
    m.Delta("g1", 0, "你好 🙂", [1, 2, 3]),
    m.Done("g1", "stop", m.Usage(3, 4), m.Timings(1.0, 0.0, 2.5, 10.0, 99.5)),
    m.Error(ErrorCode.CONFLICT, "generation 'g1' is still running", "g1"),
    m.Restarted("g1", "the node running it stopped", n=7),
    m.ServerHeartbeat(12.5),
]
CLIENT_SAMPLES: list[m.ClientMessage] = [
    m.Hello(client="test", credits=4096),
    m.Generate("g1", "tiny", "Once", m.Options(temperature=0.0, stop=["\n"]), token_ids=True),
    m.Chat("g2", "tiny", [m.ChatMessage("user", "hi")], "c-1", m.Options(max_tokens=5)),
    m.Cancel("g1"),
    m.Credit(1024),
    m.Forget("c-1"),
    m.Heartbeat(1.0),
]


@pytest.mark.parametrize("sub", [m.SUBPROTOCOL_JSON, m.SUBPROTOCOL_MSGPACK])
def test_every_message_round_trips(sub: str) -> None:
    codec = codec_for(sub)
    for msg in SERVER_SAMPLES:
        assert codec.decode_server(codec.encode(msg)) == msg
    for cmsg in CLIENT_SAMPLES:
        assert codec.decode_client(codec.encode(cmsg)) == cmsg


def test_json_frames_are_text_and_msgpack_frames_are_binary() -> None:
    assert isinstance(codec_for(m.SUBPROTOCOL_JSON).encode(m.Cancel("a")), str)
    assert isinstance(codec_for(m.SUBPROTOCOL_MSGPACK).encode(m.Cancel("a")), bytes)


def test_errors_name_the_field_path() -> None:
    codec = codec_for(m.SUBPROTOCOL_JSON)
    with pytest.raises(BadRequest, match=r"\$\.messages\[0\]\.role"):
        codec.decode_client(
            '{"type":"chat","id":"a","model":"t","messages":[{"role":"robot","content":"x"}]}'
        )
    with pytest.raises(BadRequest, match="id"):
        codec.decode_client('{"type":"cancel","id":"has space"}')


def test_server_messages_tolerate_new_fields() -> None:
    """Clients must ignore fields added in later v1 revisions."""
    codec = codec_for(m.SUBPROTOCOL_JSON)
    msg = codec.decode_server('{"type":"started","id":"g","model":"t","future_field":1}')
    assert msg == m.Started("g", "t")


def test_schema_json_is_fresh() -> None:
    assert SCHEMA_PATH.read_text() == render_schema(), "run: python -m protocol.schema"
    schema = msgspec.json.decode(SCHEMA_PATH.read_bytes())
    assert {"ClientMessage", "ServerMessage", "Delta", "Chat"} <= set(schema["$defs"])
