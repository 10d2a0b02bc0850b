"""The ``ferrous`` command: serve, run, token, key, config, version, and model management.

``ferrous run MODEL [PROMPT]`` talks to a running server over the WebSocket
protocol, or starts one inside the command when none answers; without a
prompt it opens an interactive chat. Ctrl-C cancels the answer being
streamed, not the program (a second Ctrl-C, or one at the prompt, exits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence

import msgspec
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from gateway.app import __version__
from gateway.config import ConfigError, ServerConfig, load_config, redacted, render_toml
from gateway.modelcli import COMMANDS, add_model_commands, ensure_local_model, run_model_command
from gateway.scopes import ALL_SCOPES, parse_scopes
from gateway.server import build_authenticator, running_server, serve
from protocol import messages as m
from protocol.codec import codec_for

__all__ = ["main"]

_JSON = codec_for(m.SUBPROTOCOL_JSON)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, attr in (
        ("host", "host"),
        ("port", "port"),
        ("workers", "workers"),
        ("threads_per_worker", "threads"),
        ("log.level", "log_level"),
        ("log.format", "log_format"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    if getattr(args, "no_auth", False):
        out["auth.enabled"] = False
    for spec in getattr(args, "load_models", None) or []:
        name, _, path = spec.partition("=")
        if not path:
            raise ConfigError(f"--model expects NAME=PATH, got {spec!r}")
        out[f"models.{name}"] = {"path": path}
    return out


def _config(args: argparse.Namespace) -> ServerConfig:
    return load_config(args.config, overrides=_overrides(args))


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file (default: FERROUS_HOME/config.toml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)


# -- run ------------------------------------------------------------------------------------


def _server_up(config: ServerConfig) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://{config.host}:{config.port}/healthz", timeout=0.5
        ) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.asynccontextmanager
async def _server_for(config: ServerConfig) -> AsyncIterator[str]:
    """The WebSocket URL of a running server, starting one in-process if none answers."""
    if _server_up(config):
        yield f"ws://{config.host}:{config.port}/v1/ws"
        return
    print(
        f"(no server on {config.host}:{config.port}; starting one in this process)", file=sys.stderr
    )
    embedded = msgspec.structs.replace(config, port=0)
    async with running_server(embedded) as running:
        yield running.ws_url


async def _recv(ws: ClientConnection) -> m.ServerMessage:
    return _JSON.decode_server(await ws.recv())


async def _ask(
    ws: ClientConnection,
    gen_id: str,
    model: str,
    text: str,
    conversation: str | None,
    options: m.Options,
) -> str | None:
    await ws.send(
        _JSON.encode(m.Chat(gen_id, model, [m.ChatMessage("user", text)], conversation, options))
    )
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    pending: set[asyncio.Task[None]] = set()

    def on_sigint() -> None:
        if pending:  # a second Ctrl-C: leave
            if me is not None:
                me.cancel()
            return
        pending.add(asyncio.ensure_future(ws.send(_JSON.encode(m.Cancel(gen_id)))))

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        while True:
            msg = await _recv(ws)
            match msg:
                case m.Started():
                    conversation = msg.conversation
                case m.Delta():
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                case m.Done():
                    t = msg.timings
                    note = (
                        "" if msg.finish_reason in ("stop", "length") else f" [{msg.finish_reason}]"
                    )
                    print(f"{note}\n", flush=True)
                    print(
                        f"({msg.usage.completion_tokens} tokens, {t.decode_tok_s:.1f} tok/s, "
                        f"first token {t.ttft_ms:.0f} ms)",
                        file=sys.stderr,
                    )
                    return conversation
                case m.Error():
                    print(f"\nerror: {msg.code.value}: {msg.message}", file=sys.stderr)
                    if msg.id == gen_id and msg.code.value != "engine_error":
                        return conversation
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    model = await ensure_local_model(config, args.model)
    options = m.Options(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    auth = build_authenticator(config)
    # The server's own user, who can read its secret anyway: the local admin.
    token = (
        auth.issue_token(sub=getpass.getuser(), ttl=24 * 3600, scopes=ALL_SCOPES)
        if auth.enabled
        else None
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        _server_for(config) as url,
        connect(
            url,
            subprotocols=[Subprotocol(m.SUBPROTOCOL_JSON)],
            additional_headers=headers,
            max_size=None,
        ) as ws,
    ):
        await ws.send(_JSON.encode(m.Hello(client="ferrous-cli")))
        ready = await _recv(ws)
        if not isinstance(ready, m.Ready):
            print(f"error: {ready}", file=sys.stderr)
            return 1
        conversation: str | None = None
        if args.prompt:
            conversation = await _ask(ws, "g1", model, " ".join(args.prompt), None, options)
            return 0
        n = 0
        while True:
            try:
                line = await asyncio.to_thread(input, ">>> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line.strip():
                continue
            if line.strip() in ("/bye", "/exit"):
                return 0
            n += 1
            conversation = await _ask(ws, f"g{n}", model, line, conversation, options)


SCOPE_HELP = (
    "what the credential allows: generate, models:read, models:write, admin "
    "(repeat or space-separate; default: generate models:read)"
)


PRIORITY_HELP = (
    "the highest scheduling priority the credential's requests may ask for (-100..100; default 0)"
)


def _scopes(values: list[str] | None) -> frozenset[str] | None:
    if not values:
        return None
    try:
        return parse_scopes(" ".join(values))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _keys(args: argparse.Namespace) -> int:
    auth = build_authenticator(load_config(args.config))
    if args.key_command == "create":
        print(
            auth.create_api_key(
                args.user, args.tenant, args.name, _scopes(args.scope), args.priority
            )
        )
        return 0
    if args.key_command == "revoke":
        if auth.revoke_api_key(args.key):
            return 0
        print("ferrous: no such key", file=sys.stderr)
        return 1
    for info in auth.list_api_keys():
        print(
            f"{info.prefix}…  user={info.user} tenant={info.tenant or '-'} "
            f"name={info.name or '-'} scopes={' '.join(info.scopes)}"
        )
    return 0


# -- entry ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrous", description="FerrousForge model server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    _server_flags(p)
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int, help="threads per worker")
    p.add_argument(
        "--model",
        action="append",
        dest="load_models",
        metavar="NAME=PATH",
        help="load a GGUF at start",
    )
    p.add_argument("--no-auth", action="store_true", help="no authentication (loopback only)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("text", "json"))

    p = sub.add_parser("run", help="chat with a model (starts a server when none runs)")
    _server_flags(p)
    p.add_argument("model", help="a model name (pulled when in the catalog) or a GGUF path")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)

    p = sub.add_parser("token", help="print a token for this server's local secret")
    p.add_argument("--config")
    p.add_argument("--sub", default=None, help="user (default: you)")
    p.add_argument("--tenant")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds")
    p.add_argument("--scope", action="append", help=SCOPE_HELP)
    p.add_argument("--priority", type=int, default=0, help=PRIORITY_HELP)

    p = sub.add_parser("key", help="manage API keys (stored hashed)")
    p.add_argument("--config")
    keys = p.add_subparsers(dest="key_command", required=True)
    k = keys.add_parser("create", help="create a key and print it once")
    k.add_argument("--user", required=True)
    k.add_argument("--tenant")
    k.add_argument("--name", default="")
    k.add_argument("--scope", action="append", help=SCOPE_HELP)
    k.add_argument("--priority", type=int, default=0, help=PRIORITY_HELP)
    k = keys.add_parser("revoke", help="revoke a key by its text or its prefix")
    k.add_argument("key")
    keys.add_parser("list", help="list keys (prefixes only)")

    p = sub.add_parser("config", help="print the effective configuration (secrets redacted)")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")

    sub.add_parser("version", help="print the version")
    add_model_commands(sub)

    args = parser.parse_args(argv)
    try:
        if args.command == "version":
            print(f"ferrousforge {__version__}")
            return 0
        if args.command == "config":
            data = redacted(load_config(args.config))
            print(json.dumps(data, indent=2) if args.json else render_toml(data), end="")
            return 0
        if args.command == "token":
            auth = build_authenticator(load_config(args.config))
            print(
                auth.issue_token(
                    sub=args.sub or getpass.getuser(),
                    tenant=args.tenant,
                    ttl=args.ttl,
                    scopes=_scopes(args.scope),
                    priority=args.priority,
                )
            )
            return 0
        if args.command == "key":
            return _keys(args)
        if args.command in COMMANDS:
            return run_model_command(args)
        if args.command == "serve":
            return uvloop.run(serve(_config(args)))
        if args.command == "run":
            return uvloop.run(_run(args))
    except ConfigError as exc:
        print(f"ferrous: {exc.message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
