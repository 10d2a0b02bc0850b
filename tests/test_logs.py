"""Logging: JSON and text lines that carry the bound session and request ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from gateway.logs import (
    JsonFormatter,
    bind,
    configure_logging,
    request_id,
    session_id,
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the root and ferrous loggers as they were for the rest of the suite."""
    root = logging.getLogger()
    ferrous = logging.getLogger("ferrous")
    saved = (list(root.handlers), root.level, ferrous.level, ferrous.propagate)
    yield
    for handler in root.handlers[:]:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])
    ferrous.setLevel(saved[2])
    ferrous.propagate = saved[3]


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_carry_bound_session_and_request() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    log = logging.getLogger("ferrous.test")
    with bind(session="s-1"):
        log.info("opened")
        with bind(request="r-9"):
            log.debug("token %d", 3, extra={"tokens": 3, "blob": object()})
        log.info("after")
    log.info("outside")

    records = [json.loads(line) for line in lines(out)]
    assert [(r["message"], r["session"], r["request"]) for r in records] == [
        ("opened", "s-1", None),
        ("token 3", "s-1", "r-9"),
        ("after", "s-1", None),
        ("outside", None, None),
    ]
    second = records[1]
    assert second["level"] == "debug"
    assert second["logger"] == "ferrous.test"
    assert second["tokens"] == 3
    assert "blob" not in second  # not JSON-serialisable: left out
    ts = datetime.fromisoformat(second["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() == timedelta(0)


def test_json_lines_include_the_exception() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    with bind(session="s-2", request="r-2"):
        try:
            raise RuntimeError("kaboom")
        except RuntimeError:
            logging.getLogger("ferrous.test").exception("failed")
    (record,) = [json.loads(line) for line in lines(out)]
    assert record["level"] == "error"
    assert record["message"] == "failed"
    assert "RuntimeError: kaboom" in record["exc_info"]
    assert (record["session"], record["request"]) == ("s-2", "r-2")


def test_text_format_shows_ids_only_when_bound() -> None:
    out = io.StringIO()
    configure_logging("info", "text", out)
    log = logging.getLogger("ferrous.gateway")
    log.info("plain line")
    with bind(session="abc", request="req-1"):
        log.warning("bound line")
    plain, bound = lines(out)
    assert re.fullmatch(r"\S+ \S+ INFO ferrous\.gateway plain line", plain)
    assert re.fullmatch(
        r"\S+ \S+ WARNING ferrous\.gateway \[session=abc request=req-1\] bound line", bound
    )


def test_bind_restores_previous_values() -> None:
    assert (session_id.get(), request_id.get()) == (None, None)
    with bind(session="outer"):
        with bind(session="inner", request="r"):
            assert (session_id.get(), request_id.get()) == ("inner", "r")
        assert (session_id.get(), request_id.get()) == ("outer", None)
    assert (session_id.get(), request_id.get()) == (None, None)


async def test_ids_follow_each_asyncio_task() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = logging.getLogger("ferrous.sessions")

    async def session(name: str) -> None:
        with bind(session=name):
            for i in range(3):
                with bind(request=f"{name}-{i}"):
                    await asyncio.sleep(0)
                    log.info("step")

    await asyncio.gather(session("a"), session("b"))
    seen = {(r["session"], r["request"]) for r in map(json.loads, lines(out))}
    assert seen == {(s, f"{s}-{i}") for s in "ab" for i in range(3)}


def test_configure_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "text", first)
    configure_logging("info", "json", second)
    logging.getLogger("ferrous.test").info("once")
    assert first.getvalue() == ""
    (line,) = lines(second)
    assert json.loads(line)["message"] == "once"


def test_levels_ferrous_configured_third_party_at_warning() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    logging.getLogger("ferrous.engine").debug("ours")
    logging.getLogger("uvicorn.error").info("chatty")
    logging.getLogger("websockets.server").info("chatty")
    logging.getLogger("websockets.server").warning("important")
    assert [json.loads(line)["message"] for line in lines(out)] == ["ours", "important"]

    out = io.StringIO()
    configure_logging("warning", "text", out)
    logging.getLogger("ferrous.engine").info("quiet now")
    assert out.getvalue() == ""


def test_bad_level_or_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


def test_json_formatter_without_filter_has_null_ids() -> None:
    record = logging.LogRecord("ferrous.x", logging.INFO, __file__, 1, "msg %s", ("x",), None)
    data = json.loads(JsonFormatter().format(record))
    assert (data["message"], data["session"], data["request"]) == ("msg x", None, None)
