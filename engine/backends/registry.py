"""The backends the engine knows, and which one takes a model path.

Entries are tried in order; the first whose layout claims the path takes it
(more specific layouts first: an ONNX encoder folder before any ONNX folder,
folders before the GGUF entries, which take any file). A request may name a
backend; then only entries of that name are tried, and when none claims the
path, the last of them inspects it, so the error says what that backend
expected (``not_onnx``, ``not_gguf``, ...).

Backend modules import large native libraries, so nothing here imports one:
an entry names its module and the package it needs, and a missing optional
backend is a typed error, not an ImportError.

**Plugins.** Backends are found through the entry-point group
:data:`GROUP` (``ferrousforge.backends``): an installed package declares
``name = "module:EntryClass"`` (a :class:`~engine.backends.entry.BackendEntry`
subclass, an instance, or a list of them) and its entries are tried before
the built-in ones, so a plugin may take a layout the built-ins would
otherwise claim. The built-in entries are declared in the same group by
this project's own package (and are also known without it, from a source
checkout). A plugin that fails to import or declares something else is
logged and skipped (:func:`plugins` says why), never fatal; ``ferrous
backends`` lists them all.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from engine.backends.diffusion_entry import DiffusionEntry
from engine.backends.entry import BackendEntry
from engine.backends.gguf_entry import CTransformersEntry, LlamaCppEntry
from engine.backends.image_entry import OnnxClipEntry, OnnxImageClassifierEntry
from engine.backends.onnx_entry import OnnxDecoderEntry, OnnxEncoderEntry
from engine.backends.tts_entry import HibariEntry
from engine.backends.whisper_entry import WhisperEntry
from protocol.errors import BadRequest

__all__ = [
    "BUILTIN",
    "GROUP",
    "Plugin",
    "available_backends",
    "backend_names",
    "entries",
    "find_entry",
    "installed",
    "plugins",
]

GROUP = "ferrousforge.backends"
log = logging.getLogger("ferrous.engine")

BUILTIN: tuple[BackendEntry, ...] = (
    WhisperEntry(),
    HibariEntry(),
    DiffusionEntry(),
    OnnxClipEntry(),
    OnnxImageClassifierEntry(),
    OnnxEncoderEntry(),
    OnnxDecoderEntry(),
    LlamaCppEntry(),
    CTransformersEntry(),
)


@dataclass(frozen=True)
class Plugin:
    """One entry point of :data:`GROUP`: what it gave, or why it was skipped."""

    name: str
    target: str  # "module:attribute"
    distribution: str  # the installed package that declares it
    entries: tuple[BackendEntry, ...] = ()
    error: str = ""

    @property
    def builtin(self) -> bool:
        return bool(self.entries) and all(
            any(type(e) is type(b) for b in BUILTIN) for e in self.entries
        )


def _entries_of(obj: object) -> tuple[BackendEntry, ...]:
    items = obj if isinstance(obj, list | tuple) else [obj]
    out = []
    for item in items:
        if isinstance(item, type) and issubclass(item, BackendEntry):
            item = item()
        if not isinstance(item, BackendEntry):
            raise TypeError(f"{item!r} is not a BackendEntry (class or instance)")
        if not getattr(item, "name", "") or not getattr(item, "module", ""):
            raise TypeError(f"{type(item).__name__} does not name its backend and module")
        out.append(item)
    return tuple(out)


@functools.cache
def plugins() -> tuple[Plugin, ...]:
    """Every entry point of :data:`GROUP`, loaded (once per process)."""
    found = []
    for ep in sorted(
        entry_points(group=GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)
    ):
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            found.append(Plugin(ep.name, ep.value, dist, _entries_of(ep.load())))
        except (Exception, SystemExit) as exc:  # a third party's import: anything may go wrong
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("backend plugin %r from %s skipped: %s", ep.name, dist, reason)
            found.append(Plugin(ep.name, ep.value, dist, error=reason))
    return tuple(found)


@functools.cache
def entries() -> tuple[BackendEntry, ...]:
    """The registry: plugins' entries first (those that are not built-in), then the built-ins."""
    builtin_types = {type(b) for b in BUILTIN}
    extra = [e for p in plugins() for e in p.entries if type(e) not in builtin_types]
    return (*extra, *BUILTIN)


def backend_names() -> list[str]:
    """Public backend names, each once, in registry order."""
    return list(dict.fromkeys(e.name for e in entries()))


def _asks(entry: BackendEntry, question: str, *args: object) -> bool:
    """``entry.question(*args)``, where a plugin's fault is a logged no, not the
    caller's exception: one broken plugin must not stop models the others take."""
    try:
        return bool(getattr(entry, question)(*args))
    except Exception as exc:
        log.warning("backend %r: %s() failed, taken as no: %s", entry.name, question, exc)
        return False


def installed(entry: BackendEntry) -> bool:
    """Whether ``entry``'s runtime package is installed (a plugin that cannot say: no)."""
    return _asks(entry, "installed")


def available_backends() -> list[str]:
    """Names of backends whose runtime package is installed."""
    return list(dict.fromkeys(e.name for e in entries() if installed(e)))


def find_entry(path: str, requested: str | None = None) -> BackendEntry:
    """The entry that takes ``path``: the first that claims it (of ``requested``'s, if named)."""
    if requested:
        candidates = [e for e in entries() if e.name == requested]
        if not candidates:
            raise BadRequest(f"unknown backend {requested!r}; known: {', '.join(backend_names())}")
    else:
        candidates = [e for e in entries() if e.default]
    for entry in candidates:
        if _asks(entry, "claims", path):
            return entry
    return candidates[-1]
