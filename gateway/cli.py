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
import errno
import getpass
import json
import re
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from engine.images import for_sending
from engine.store.names import did_you_mean
from gateway.config import ConfigError, ServerConfig, ferrous_home
from gateway.configload import load_config, redacted, render_toml
from gateway.credentials import REVOKED_FILE, FileRevocations, key_identity, token_identity
from gateway.modelcli import (
    COMMANDS,
    add_model_commands,
    ensure_local_model,
    model_names,
    run_model_command,
)
from gateway.repl import Session, image_paths, parse
from gateway.scopes import ALL_SCOPES, parse_scopes
from gateway.server import build_authenticator, running_server, serve
from gateway.version import __version__
from protocol import messages as m
from protocol.codec import codec_for
from protocol.errors import ErrorCode, FerrousError

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


async def _ask(ws: ClientConnection, gen_id: str, session: Session, text: str) -> bool:
    """Send one user turn and print the answer as it streams; False when it failed."""
    text, images = _images_in(text)
    messages = [m.ChatMessage("user", text, images=images or None)]
    if session.system and not session.system_sent:
        messages.insert(0, m.ChatMessage("system", session.system))
    await ws.send(
        _JSON.encode(
            m.Chat(
                gen_id,
                session.model,
                messages,
                session.conversation,
                session.options,
                format=session.format,
            )
        )
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
    said: list[str] = []
    try:
        while True:
            msg = await _recv(ws)
            match msg:
                case m.Started():
                    session.conversation = msg.conversation
                    session.system_sent = True
                case m.Delta():
                    said.append(msg.text)
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                case m.Done():
                    t = msg.timings
                    note = (
                        "" if msg.finish_reason in ("stop", "length") else f" [{msg.finish_reason}]"
                    )
                    print(f"{note}\n", flush=True)
                    if msg.finish_reason == "length":
                        print(
                            f"(the answer stopped at the token limit, {msg.usage.completion_tokens}"
                            " tokens: raise it with --max-tokens or /set parameter num_predict)",
                            file=sys.stderr,
                        )
                    print(
                        f"({msg.usage.completion_tokens} tokens, {t.decode_tok_s:.1f} tok/s, "
                        f"first token {t.ttft_ms:.0f} ms)",
                        file=sys.stderr,
                    )
                    if msg.finish_reason in ("stop", "length"):
                        session.turns.append((text, "".join(said)))
                    return msg.finish_reason in ("stop", "length", "cancelled")
                case m.Error():
                    hint = ""
                    if msg.code is ErrorCode.MODEL_NOT_FOUND:
                        hint = _model_hint(session.model)
                    print(f"\nferrous: {msg.message}{hint}", file=sys.stderr)
                    if msg.id == gen_id and msg.code is not ErrorCode.ENGINE_ERROR:
                        return False
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _save(ws_url: str, headers: dict[str, str], name: str, modelfile: str) -> bool:
    """``/save NAME``: create the model on the server the chat runs on."""
    base = ws_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    base = base.removesuffix("/v1/ws")
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"{base}/v1/models/create", json={"name": name, "modelfile": modelfile}, headers=headers
        )
    if r.status_code != 200:
        try:
            why = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = f"HTTP {r.status_code}"
        print(f"ferrous: could not save {name!r}: {why}", file=sys.stderr)
        return False
    print(f"Created new model {name!r}.")
    return True


def _images_in(text: str) -> tuple[str, list[bytes]]:
    """The images a message names by path (files only, as Ollama's CLI does), read and
    made small enough for one frame, and the text without their paths."""
    images: list[bytes] = []
    for written, path in image_paths(text):
        file = Path(path).expanduser()
        if not file.is_file():
            continue
        try:
            images.append(for_sending(file.read_bytes()))
        except (OSError, FerrousError) as exc:
            why = exc.message if isinstance(exc, FerrousError) else str(exc)
            print(f"ferrous: {path}: {why}", file=sys.stderr)
            continue
        text = text.replace(written, "", 1)
        print(f"Added image '{path}'", file=sys.stderr)
    return (re.sub(r"[ \t]{2,}", " ", text).strip() if images else text), images


def _model_hint(name: str) -> str:
    """ " (did you mean 'x'?)" from the models this machine knows, or ""."""
    known = set(_LOCAL_CONFIG.models) if _LOCAL_CONFIG is not None else set()
    with contextlib.suppress(Exception):  # a hint only: a broken store must not hide the error
        known |= set(model_names(_LOCAL_CONFIG)) if _LOCAL_CONFIG is not None else set()
    return did_you_mean(name, sorted(known))


_LOCAL_CONFIG: ServerConfig | None = None


def _read_message(first: str, read: Callable[[str], str]) -> str:
    """A line, or the lines between two \"\"\" lines (typed at "... " prompts)."""
    if not first.strip().startswith('"""'):
        return first
    parts = [first.strip()[3:]]
    while True:
        line = read("... ")
        if line.rstrip().endswith('"""'):
            parts.append(line.rstrip()[:-3])
            return "\n".join(parts).strip("\n")
        parts.append(line)


async def _run(args: argparse.Namespace) -> int:
    global _LOCAL_CONFIG
    config = _LOCAL_CONFIG = _config(args)
    model = await ensure_local_model(config, args.model)
    options = m.Options(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    session = Session(model, options)
    interactive = sys.stdin.isatty()
    prompt = " ".join(args.prompt)
    if not interactive and args.prompt:
        # Piped input goes with the words given (as in `cat notes.txt | ferrous run m summarise`).
        piped = sys.stdin.read()
        prompt = f"{prompt}\n\n{piped}" if piped.strip() else prompt
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
            print(f"ferrous: {getattr(ready, 'message', ready)}", file=sys.stderr)
            return 1
        if args.prompt:
            return 0 if await _ask(ws, "g1", session, prompt) else 1
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())

        def read(shown: str) -> str:
            return input(shown if interactive else "")

        n = 0
        failed = False
        while True:
            try:
                line = await asyncio.to_thread(read, ">>> ")
                text = await asyncio.to_thread(_read_message, line, read)
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print()
                return 1 if failed and not interactive else 0
            if not text.strip():
                continue
            command = parse(text, session)
            if command.kind == "quit":
                return 1 if failed and not interactive else 0
            if command.kind == "message":
                n += 1
                failed = not await _ask(ws, f"g{n}", session, command.text) or failed
            elif command.kind == "save":
                saved = await _save(url, headers, command.name, command.text)
                failed = not saved or failed
            elif command.kind == "error":
                print(command.text, file=sys.stderr)
            else:
                print(command.text)


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


def _record_revocation(config: ServerConfig, identity: str, until: float) -> None:
    """Put ``identity`` on the revocation list the server reads (gateway.credentials):
    the deployment's in Redis with ``[state] url``, else this node's file."""
    if config.state.url:
        from gateway.redisauth import RedisRevocations

        async def write() -> None:
            store = RedisRevocations(config.state.url, prefix=config.state.prefix)
            try:
                await store.revoke(identity, until)
            finally:
                await store.close()

        asyncio.run(write())
    else:
        FileRevocations(ferrous_home(config) / REVOKED_FILE).revoke_now(identity, until)


def _revoke_token(config: ServerConfig, token: str) -> int:
    """``ferrous token --revoke TOKEN``: refused everywhere from now until it expires."""
    auth = build_authenticator(config)
    try:
        principal = auth.authenticate(token.strip())
    except FerrousError as exc:
        print(f"ferrous: not a valid token of this server: {exc.message}", file=sys.stderr)
        return 1
    if principal.token_id is None:
        print("ferrous: this token has no jti claim: it cannot be revoked", file=sys.stderr)
        return 1
    until = principal.expires_at if principal.expires_at is not None else float("inf")
    _record_revocation(config, token_identity(principal.token_id), until)
    return 0


def _keys(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    auth = build_authenticator(config)
    if args.key_command == "create":
        print(
            auth.api_keys.create(
                args.user, args.tenant, args.name, _scopes(args.scope), args.priority
            )
        )
        return 0
    if args.key_command == "revoke":
        deleted = auth.api_keys.revoke(args.key)
        # Listed as well, so that every node refuses it (each reads its own key file).
        key = args.key.strip()
        prefix = key[:12] if len(key) > 12 else key
        if deleted or config.state.url:
            if key.startswith("ffk_"):
                _record_revocation(config, key_identity(prefix), float("inf"))
            return 0
        print("ferrous: no such key", file=sys.stderr)
        return 1
    for info in auth.api_keys.stored():
        print(
            f"{info.prefix}…  user={info.user} tenant={info.tenant or '-'} "
            f"name={info.name or '-'} scopes={' '.join(info.scopes)}"
        )
    return 0


# -- entry ----------------------------------------------------------------------------------


EXIT_CODES = """exit status: 0 success, 1 the command failed (one line on stderr says why;
--debug shows the traceback), 2 bad usage or configuration, 130 interrupted"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ferrous",
        description="FerrousForge model server",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
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
    p.add_argument("prompt", nargs="*", default=[], help="a one-shot prompt (else a chat)")
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
    p.add_argument(
        "--revoke",
        metavar="TOKEN",
        help="revoke TOKEN (by its jti) on every node until it expires, instead",
    )

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
    p = sub.add_parser("backends", help="list the backends: built-in, plugins, and skipped plugins")
    p.add_argument("--json", action="store_true")
    add_model_commands(sub)

    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    if command is not None and command not in sub.choices:
        print(
            f"ferrous: unknown command {command!r}{did_you_mean(command, sub.choices)}; "
            "see ferrous --help",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(words)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"ferrous: {exc.message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"ferrous: {_one_line(exc)}", file=sys.stderr)
        return 1


def _backends(as_json: bool) -> int:
    """Every backend entry (plugins first, as they are tried), and plugins that were skipped."""
    from engine.backends.registry import BUILTIN, entries, installed, plugins

    builtin = {type(b) for b in BUILTIN}
    origin = {type(e): p.distribution for p in plugins() for e in p.entries}
    rows: list[dict[str, Any]] = [
        {
            "backend": e.name,
            "kinds": sorted(k.value for k in e.kinds),
            "layout": e.layout,
            "from": "built-in" if type(e) in builtin else origin.get(type(e), "?"),
            "installed": installed(e),
            "default": e.default,
        }
        for e in entries()
    ]
    skipped = [
        {"plugin": p.name, "from": p.distribution, "target": p.target, "error": p.error}
        for p in plugins()
        if p.error
    ]
    if as_json:
        print(json.dumps({"backends": rows, "skipped": skipped}, indent=2))
        return 0
    for r in rows:
        note = "" if r["installed"] else f"  (not installed: pip install {r['backend']})"
        print(f"{r['backend']:<14} {','.join(r['kinds']):<28} {r['from']:<12} {r['layout']}{note}")
    for s in skipped:
        print(f"skipped plugin {s['plugin']} from {s['from']} ({s['target']}): {s['error']}")
    return 0


def _one_line(exc: BaseException) -> str:
    """What went wrong, in the user's terms: no traceback, no internal class names."""
    if isinstance(exc, FerrousError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "version":
        print(f"ferrousforge {__version__}")
        return 0
    if args.command == "backends":
        return _backends(args.json)
    if args.command == "config":
        data = redacted(load_config(args.config))
        print(json.dumps(data, indent=2) if args.json else render_toml(data), end="")
        return 0
    if args.command == "token":
        if args.revoke:
            return _revoke_token(load_config(args.config), args.revoke)
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
        config = _config(args)
        try:
            return uvloop.run(serve(config))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            print(
                f"ferrous: cannot listen on {config.host}:{config.port}: the address is in use "
                "(another server? pick one with --port)",
                file=sys.stderr,
            )
            return 1
    if args.command == "run":
        return uvloop.run(_run(args))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
