"""Property-based fuzzing of the pure protocol layer (messages, codec, errors, durations).

Strategies are derived from msgspec's own view of the message types
(``msgspec.inspect``), constraints included, so a field added to
``protocol/messages.py`` is fuzzed without touching this file. The properties:

* every server and client message survives a round trip through both
  subprotocols, and server messages leave out fields at their default;
* decoding anything (arbitrary bytes and text, byte-level mutations of valid
  frames, structural mutations of valid messages) yields a valid message or
  raises :class:`protocol.errors.BadRequest`, never another exception, because
  the session loop only turns ``FerrousError`` into a typed ``error`` message;
* error codes survive their wire form; durations are finite or ``BadRequest``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.codec import Codec, codec_for
from protocol.durations import parse_duration
from protocol.errors import (
    ERRORS_BY_CODE,
    BadRequest,
    ErrorCode,
    FerrousError,
    error_from_code,
)

JSON = codec_for(m.SUBPROTOCOL_JSON)
MSGPACK = codec_for(m.SUBPROTOCOL_MSGPACK)
CODECS = [JSON, MSGPACK]

# Reproducible and bounded: the same examples on every run, no per-example deadline.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT64 = (-(2**63), 2**63 - 1)  # what both encodings carry without overflow

# -- strategies derived from msgspec's type information --------------------------------------

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(*INT64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
"""Values an ``Any`` field may hold that both encodings carry unchanged."""


def _str_strategy(t: mi.StrType) -> st.SearchStrategy[str]:
    lo = t.min_length or 0
    hi = min(t.max_length if t.max_length is not None else 40, 40)
    if t.pattern is None:
        return st.text(min_size=lo, max_size=max(lo, hi))
    # fullmatch: the pattern's intent ("only these characters"), not Python's `$` leniency.
    pattern = re.compile(t.pattern)
    return (
        st.from_regex(pattern, fullmatch=True)
        .map(lambda s: s[: t.max_length] if t.max_length is not None else s)
        .filter(lambda s: len(s) >= lo and pattern.search(s) is not None)
    )


def strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    """Valid values of a msgspec type, constraints respected (the encoder's domain)."""
    match t:
        case mi.NoneType():
            return st.none()
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else INT64[0])
            hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else INT64[1])
            return st.integers(max(lo, INT64[0]), min(hi, INT64[1]))
        case mi.FloatType():
            return st.floats(
                min_value=t.ge if t.ge is not None else t.gt,
                max_value=t.le if t.le is not None else t.lt,
                exclude_min=t.gt is not None,
                exclude_max=t.lt is not None,
                allow_nan=False,
                allow_infinity=False,
            )
        case mi.StrType():
            return _str_strategy(t)
        case mi.BytesType():
            return st.binary(min_size=t.min_length or 0, max_size=min(t.max_length or 64, 64))
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.EnumType():
            return st.sampled_from(list(t.cls))
        case mi.AnyType():
            return json_values
        case mi.ListType():
            lo = t.min_length or 0
            hi = min(t.max_length if t.max_length is not None else 4, max(lo, 4))
            return st.lists(strategy_for(t.item_type), min_size=lo, max_size=hi)
        case mi.DictType():
            return st.dictionaries(strategy_for(t.key_type), strategy_for(t.value_type), max_size=4)
        case mi.UnionType():
            return st.one_of(*(strategy_for(x) for x in t.types))
        case mi.StructType():
            required = {f.name: strategy_for(f.type) for f in t.fields if f.required}
            optional = {f.name: strategy_for(f.type) for f in t.fields if not f.required}
            cls = t.cls
            return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))
    raise NotImplementedError(f"no strategy for {t!r}")


server_messages: st.SearchStrategy[Any] = strategy_for(mi.type_info(m.ServerMessage))
client_messages: st.SearchStrategy[Any] = strategy_for(mi.type_info(m.ClientMessage))
codecs = st.sampled_from(CODECS)


def _struct_info(cls: type[Any]) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


# -- helpers ----------------------------------------------------------------------------------


def decodes_or_bad_request(codec: Codec, data: bytes | str, *, server: bool = False) -> bool:
    """True when ``data`` decoded into a message, False on BadRequest; anything else escapes."""
    try:
        msg = codec.decode_server(data) if server else codec.decode_client(data)
    except BadRequest as exc:
        assert exc.code is ErrorCode.BAD_REQUEST and exc.message
        return False
    union = m.SERVER_MESSAGES if server else m.CLIENT_MESSAGES
    assert isinstance(msg, union)
    return True


INTERESTING = b'\x00\x7f\x80\xc0\xc1\xd9\xdc\xdd\xde\xdf\xff"\\{}[]:,0-e.'


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after 1-4 byte-level mutations, the kinds a fuzzer or a broken client makes."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "dup", "truncate"]))
        i = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = draw(st.sampled_from(INTERESTING))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            buf[i:i] = draw(
                st.binary(min_size=1, max_size=8) | st.sampled_from([b"[", b"{", b"\x91"])
            )
        elif op == "dup":
            buf[i:i] = buf[i : i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


def wire_bytes(codec: Codec, msg: Any) -> bytes:
    data = codec.encode(msg)
    return data.encode("utf-8") if isinstance(data, str) else data


def as_frame(codec: Codec, payload: bytes) -> bytes | str:
    """A frame payload of ``codec``'s kind; text frames are UTF-8 on the wire (RFC 6455)."""
    return payload.decode("utf-8", "replace") if not codec.binary else payload


# -- round trips ------------------------------------------------------------------------------


@FUZZ
@given(msg=server_messages, codec=codecs)
def test_every_server_message_round_trips(msg: Any, codec: Codec) -> None:
    data = codec.encode(msg)
    assert isinstance(data, bytes if codec.binary else str)
    assert codec.decode_server(data) == msg


@FUZZ
@given(msg=client_messages, codec=codecs)
def test_every_client_message_round_trips(msg: Any, codec: Codec) -> None:
    assert codec.decode_client(codec.encode(msg)) == msg


@FUZZ
@given(msg=server_messages)
def test_both_encodings_carry_the_same_fields(msg: Any) -> None:
    """One message, two encodings, one meaning: clients may switch subprotocol freely."""
    as_json = msgspec.json.decode(JSON.encode(msg))
    packed = MSGPACK.encode(msg)
    assert isinstance(packed, bytes)
    as_msgpack = msgspec.msgpack.decode(packed)
    # Bytes (audio) are base64 text in JSON and bin in MessagePack: the same once typed.
    assert as_json.keys() == as_msgpack.keys()
    typed = type(msg)
    assert msgspec.json.decode(JSON.encode(msg), type=typed) == msgspec.msgpack.decode(
        packed, type=typed
    )


@FUZZ
@given(msg=server_messages)
def test_server_messages_leave_out_defaults(msg: Any) -> None:
    """docs/protocol.md promises fields at their default are never sent."""
    wire = msgspec.json.decode(JSON.encode(msg))
    assert wire["type"] == type(msg).__struct_config__.tag
    for field in _struct_info(type(msg)).fields:
        value = getattr(msg, field.name)
        if not field.required and value == field.default and not _computed_float(value):
            assert field.encode_name not in wire, field.name


def _computed_float(value: object) -> bool:
    """Floats are left out when they *are* the default (msgspec compares a float by
    identity): a field the server never sets keeps it. An equal float made elsewhere
    (and -0.0, another value on the wire) may be sent."""
    return isinstance(value, float)


# -- decoding hostile input -------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=512), server=st.booleans())
def test_arbitrary_bytes_are_a_message_or_bad_request(data: bytes, server: bool) -> None:
    decodes_or_bad_request(MSGPACK, data, server=server)
    decodes_or_bad_request(JSON, data.decode("utf-8", "replace"), server=server)
    # The wrong frame kind for the subprotocol is refused before any decoding.
    with pytest.raises(BadRequest, match=r"binary frame on ferrous\.v1\.json"):
        JSON.decode_client(data)
    with pytest.raises(BadRequest, match=r"text frame on ferrous\.v1\.msgpack"):
        MSGPACK.decode_client(data.decode("latin-1"))


@FUZZ
@given(text=st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=200))
def test_arbitrary_text_even_lone_surrogates_is_a_message_or_bad_request(text: str) -> None:
    """A str that is not valid UTF-8 (lone surrogates) cannot reach us over a WebSocket, but
    an embedding caller can pass one: it must still be a BadRequest, not a UnicodeError."""
    decodes_or_bad_request(JSON, text)
    decodes_or_bad_request(JSON, '{"type":"hello","client":"' + text + '"}')
    decodes_or_bad_request(JSON, text, server=True)


@FUZZ
@given(data=st.data(), msg=client_messages, codec=codecs)
def test_mutated_client_frames_are_a_message_or_bad_request(
    data: st.DataObject, msg: Any, codec: Codec
) -> None:
    payload = data.draw(mutated(wire_bytes(codec, msg)))
    decodes_or_bad_request(codec, as_frame(codec, payload))
    decodes_or_bad_request(JSON, payload.decode("utf-8", "surrogateescape"))


@FUZZ
@given(data=st.data(), msg=server_messages, codec=codecs)
def test_mutated_server_frames_are_a_message_or_bad_request(
    data: st.DataObject, msg: Any, codec: Codec
) -> None:
    """Clients use the same codec: a corrupted server frame must not crash them either."""
    payload = data.draw(mutated(wire_bytes(codec, msg)))
    decodes_or_bad_request(codec, as_frame(codec, payload), server=True)


HOLE = "\x00hole\x00"
NEST_SHAPES: list[dict[str, Any] | str] = [
    {"type": "generate", "id": "g", "model": "m", "prompt": "p", "format": {"a": HOLE}},
    {"type": "hello", "client": HOLE},
    HOLE,
]


def nested_payload(
    codec: Codec, shape: dict[str, Any] | str, depth: int, array: bool
) -> bytes | str:
    """``shape`` with ``depth`` nested arrays (or maps) where HOLE is, built as text/bytes:
    no Python value that deep needs to exist on the sending side."""
    if codec.binary:
        inner = (b"\x91" if array else b"\x81\xa1a") * depth + b"\x01"
        return msgspec.msgpack.encode(shape).replace(msgspec.msgpack.encode(HOLE), inner)
    text = ("[" if array else '{"a":') * depth + "1" + ("]" if array else "}") * depth
    return msgspec.json.encode(shape).decode().replace(msgspec.json.encode(HOLE).decode(), text)


@FUZZ
@given(
    depth=st.integers(1, 20_000),
    array=st.booleans(),
    shape=st.sampled_from(NEST_SHAPES),
    codec=codecs,
)
def test_deep_nesting_anywhere_is_a_message_or_bad_request(
    depth: int, array: bool, shape: dict[str, Any] | str, codec: Codec
) -> None:
    """Free-form fields (a JSON schema in ``format``) accept any depth the decoder allows;
    beyond that the answer is ``nested too deeply``, never a RecursionError."""
    decodes_or_bad_request(codec, nested_payload(codec, shape, depth, array))


@FUZZ
@given(
    number=st.one_of(
        st.integers(-(10**400), 10**400),
        st.sampled_from(["1e999", "-1e999", "1e-999", "9" * 4400, "-0", "0.0e0", "1E400"]),
    ),
    field=st.sampled_from(["protocol", "credits", "ts", "bytes", "seed", "max_tokens"]),
)
def test_huge_numbers_are_a_message_or_bad_request(number: int | str, field: str) -> None:
    literal = str(number)
    bodies = {
        "protocol": '{"type":"hello","protocol":%s}',
        "credits": '{"type":"hello","credits":%s}',
        "ts": '{"type":"heartbeat","ts":%s}',
        "bytes": '{"type":"credit","bytes":%s}',
        "seed": '{"type":"generate","id":"g","model":"m","prompt":"p","options":{"seed":%s}}',
        "max_tokens": '{"type":"generate","id":"g","model":"m","prompt":"p",'
        '"options":{"max_tokens":%s}}',
    }
    text = bodies[field] % literal
    if decodes_or_bad_request(JSON, text):
        # Whatever decoded can be formatted: the session quotes values in error messages
        # (`protocol version N is not supported`), and int->str has a digit limit in Python.
        assert repr(JSON.decode_client(text))


# -- structural mutations: the errors name what is wrong ----------------------------------------


WRONG = [[None]]  # of the wrong type for every field of every client message


@FUZZ
@given(msg=client_messages, data=st.data(), codec=codecs)
def test_structural_mutations_are_refused_naming_the_field(
    msg: Any, data: st.DataObject, codec: Codec
) -> None:
    # Bytes stay bytes for MessagePack (bin), base64 text for JSON.
    wire: dict[str, Any] = msgspec.to_builtins(msg, builtin_types=(bytes,) if codec.binary else ())
    fields = list(_struct_info(type(msg)).fields)
    enc = msgspec.msgpack.encode if codec.binary else (lambda o: msgspec.json.encode(o).decode())
    op = data.draw(st.sampled_from(["unknown", "wrong", "missing", "tag", "not_a_map"]))
    if op == "unknown":
        key = data.draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in wire))
        wire[key] = data.draw(json_values)
        expect = "unknown field"
    elif op == "wrong" and fields:
        field = data.draw(st.sampled_from(fields))
        wire[field.encode_name] = WRONG
        expect = f"$.{field.encode_name}"
    elif op == "missing" and any(f.required for f in fields):
        field = data.draw(st.sampled_from([f for f in fields if f.required]))
        del wire[field.encode_name]
        expect = f"missing required field `{field.encode_name}`"
    elif op == "tag":
        tags = {c.__struct_config__.tag for c in m.CLIENT_MESSAGES}
        wire["type"] = data.draw(
            st.one_of(st.text(max_size=12).filter(lambda t: t not in tags), json_values)
        )
        expect = "$.type" if isinstance(wire["type"], str) else "type"
    else:
        wire = data.draw(st.sampled_from([[wire], None, 1, "text", []]))
        expect = "invalid message"
    with pytest.raises(BadRequest) as info:
        codec.decode_client(enc(wire))
    assert expect in info.value.message


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_ids_with_a_trailing_newline_are_refused(codec: Codec) -> None:
    enc = msgspec.msgpack.encode if codec.binary else (lambda o: msgspec.json.encode(o).decode())
    for wire in (
        {"type": "cancel", "id": "g1\n"},
        {"type": "forget", "conversation": "c-1\n"},
        {"type": "pull", "id": "p", "model": "x", "sha256": "a" * 64 + "\n"},
    ):
        with pytest.raises(BadRequest):
            codec.decode_client(enc(wire))


# -- errors -----------------------------------------------------------------------------------


@FUZZ
@given(code=st.sampled_from(list(ErrorCode)), message=st.text(), retryable=st.booleans())
def test_error_codes_survive_their_wire_form(
    code: ErrorCode, message: str, retryable: bool
) -> None:
    """A client rebuilding an exception from an ``error`` message gets the same code back."""
    err = error_from_code(code.value, message, retryable=retryable)
    assert isinstance(err, FerrousError)
    assert (err.code, err.message, err.retryable) == (code, message, retryable)
    if code in ERRORS_BY_CODE:
        assert type(err) is ERRORS_BY_CODE[code]
    for codec in CODECS:
        wire = codec.decode_server(
            codec.encode(m.Error(err.code, err.message, None, err.retryable))
        )
        assert isinstance(wire, m.Error)
        again = error_from_code(wire.code.value, wire.message, retryable=wire.retryable)
        assert (type(again), again.code, again.message) == (type(err), err.code, err.message)


@FUZZ
@given(code=st.text(max_size=30).filter(lambda c: c not in set(ErrorCode)), message=st.text())
def test_unknown_error_codes_become_internal(code: str, message: str) -> None:
    """docs/protocol.md: a client that meets a code it does not know treats it as internal."""
    err = error_from_code(code, message)
    assert err.code is ErrorCode.INTERNAL and type(err) is FerrousError
    # And a server message carrying one is refused by the typed decoder, not crashed on.
    for codec in CODECS:
        data = msgspec.msgpack.encode if codec.binary else msgspec.json.encode
        raw = data({"type": "error", "code": code, "message": message})
        decodes_or_bad_request(codec, raw if codec.binary else raw.decode(), server=True)


def test_every_error_class_carries_its_own_code() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.code is code and issubclass(cls, FerrousError)
    assert set(ERRORS_BY_CODE) | {ErrorCode.UNAUTHORIZED, ErrorCode.INTERNAL} == set(ErrorCode)


# -- durations (keep_alive) -------------------------------------------------------------------


@FUZZ
@given(
    value=st.one_of(
        st.text(max_size=32),
        st.from_regex(r"\A[+-]?(\d{1,400}(\.\d*)?(ms|s|m|h)){1,4}\Z"),
        st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e999", "1_000", "  5m  ", "-1"]),
        st.floats(),
        st.integers(-(10**30), 10**30),
        st.booleans(),
    )
)
def test_durations_are_finite_seconds_or_bad_request(value: Any) -> None:
    """keep_alive reaches the engine's timers: it must be a finite number of seconds."""
    try:
        seconds = parse_duration(value)
    except BadRequest as exc:
        assert "keep_alive" in exc.message
        return
    assert isinstance(seconds, float) and math.isfinite(seconds)


@FUZZ
@given(
    parts=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h"])),
        min_size=1,
        max_size=4,
    )
)
def test_duration_strings_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    assert parse_duration(text) == pytest.approx(sum(n * scale[u] for n, u in parts))
