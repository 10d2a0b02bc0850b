"""The ``ferrous`` command: serve, run, token, key, config, version, and model management.

``ferrous run MODEL [PROMPT]`` talks to a running server over the WebSocket
protocol, or starts one inside the command when none answers; without a
prompt it opens an interactive chat (:mod:`gateway.chatrun`).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any

import uvloop

from engine.store.names import did_you_mean
from gateway.chatrun import run_chat
from gateway.config import ConfigError, ServerConfig, ferrous_home
from gateway.configload import load_config, redacted, render_toml
from gateway.credentials import REVOKED_FILE, FileRevocations, key_identity, token_identity
from gateway.modelcli import (
    COMMANDS,
    add_model_commands,
    run_model_command,
)
from gateway.scopes import parse_scopes
from gateway.server import build_authenticator, serve
from gateway.version import __version__
from protocol.errors import FerrousError

__all__ = ["main"]


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
        return uvloop.run(run_chat(_config(args), args))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
