"""The installed packages are the locked ones: a fresh install gets what was tested."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def test_the_lock_pins_the_direct_dependencies() -> None:
    pins = {name.lower().replace("_", "-") for name in _pins()}
    for name in ("msgspec", "websockets", "uvicorn", "llama-cpp-python", "onnxruntime", "pytest"):
        assert name in pins


def test_every_installed_package_has_the_locked_version() -> None:
    wrong = {}
    for name, version in _pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, "installed versions differ from requirements.lock (locked, installed)"
