"""Generate ``protocol/schema.json``: the JSON Schema of both message unions.

    python -m protocol.schema           # rewrite protocol/schema.json
    python -m protocol.schema --check   # exit 1 when the file is stale

The JS client's types are generated from this file, so it is committed and a
test fails when it no longer matches the message types.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from .messages import ClientMessage, ServerMessage

__all__ = ["SCHEMA_PATH", "render_schema", "schema"]

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def _clean_descriptions(node: Any) -> Any:
    """Descriptions dedented the same way whatever msgspec version made them.

    Struct docstrings become ``description``; some msgspec releases keep the
    docstring's indentation, later ones dedent it. ``inspect.cleandoc`` is
    idempotent, so applying it here makes the committed schema (and the JS
    types generated from it) independent of the installed msgspec.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node


def schema() -> dict[str, Any]:
    (client, server), components = msgspec.json.schema_components(
        [ClientMessage, ServerMessage], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "FerrousForge WebSocket protocol v1",
        "description": "ClientMessage: client to server. ServerMessage: server to client.",
        "$defs": _clean_descriptions(
            {"ClientMessage": client, "ServerMessage": server, **components}
        ),
    }


def render_schema() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_schema()
    if "--check" in args:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python -m protocol.schema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
