"""``ferrous run``: a chat at the terminal over the WebSocket protocol.

It talks to the server the configuration names, or starts one inside the
command when none answers; without a prompt it opens an interactive chat
(:mod:`gateway.repl` parses its commands). Ctrl-C cancels the answer being
streamed, not the program (a second Ctrl-C, or one at the prompt, exits).
Kept apart from :mod:`gateway.cli`, which parses the command line and runs
the other commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import re
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from engine.images import for_sending
from engine.store.names import did_you_mean
from gateway.config import ServerConfig
from gateway.modelcli import ensure_local_model, model_names
from gateway.repl import Session, image_paths, parse
from gateway.scopes import ALL_SCOPES
from gateway.server import build_authenticator, running_server
from protocol import messages as m
from protocol.codec import codec_for
from protocol.errors import ErrorCode, FerrousError

__all__ = ["run_chat"]

_JSON = codec_for(m.SUBPROTOCOL_JSON)


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


async def run_chat(config: ServerConfig, args: argparse.Namespace) -> int:
    """``ferrous run``: one answer to the prompt given (or piped), else a chat at the
    terminal, against the server the configuration names or one started here."""
    global _LOCAL_CONFIG
    _LOCAL_CONFIG = config
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
