"""A fast, defensive reader of GGUF headers, run before a backend sees a file.

Backends written in C tend to crash, hang or allocate wildly on a truncated or
corrupt file; a crash would cost a worker process and tell the user nothing.
This module reads only the header (metadata and tensor table), with bounds on
every length it trusts, and checks that every tensor's data lies inside the
file. Array values (the vocabulary, for instance) are skipped, not decoded, so
a 100 MB model is checked in milliseconds; ``gguf.GGUFReader`` decodes every
field and takes seconds.

Errors are :class:`protocol.errors.ModelLoadError` naming the file and a reason.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

import gguf

from protocol.errors import ModelLoadError

__all__ = ["KNOWN_ARCHITECTURES", "GGUFHeader", "read_gguf_header"]

KNOWN_ARCHITECTURES: frozenset[str] = frozenset(gguf.MODEL_ARCH_NAMES.values())

_MAGIC = b"GGUF"
_MAX_KV = 1 << 20
_MAX_TENSORS = 1 << 20
_MAX_STR = 1 << 26
_MAX_DIMS = 8

# GGUF value types -> struct format (None: handled specially).
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFHeader:
    path: str
    version: int
    architecture: str
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings only
    array_lengths: dict[str, int] = field(default_factory=dict)
    n_tensors: int = 0
    file_size: int = 0
    n_params: int = 0  # elements over all tensors: the parameter count

    def get_int(self, key: str, default: int = 0) -> int:
        v = self.metadata.get(key, default)
        return int(v) if isinstance(v, int | float) else default

    @property
    def context_length(self) -> int:
        return self.get_int(f"{self.architecture}.context_length")

    @property
    def chat_template(self) -> str | None:
        v = self.metadata.get("tokenizer.chat_template")
        return v if isinstance(v, str) else None


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ModelLoadError(self.path, "truncated", f"header ends early at byte {self.pos}")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STR:
            raise ModelLoadError(self.path, "corrupt", f"string of {n} bytes at byte {self.pos}")
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        if n > _MAX_STR:
            raise ModelLoadError(self.path, "corrupt", f"string of {n} bytes at byte {self.pos}")
        self.take(n)

    def value(self, vtype: int, key: str) -> tuple[Any, int | None]:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype]), None
        if vtype == _STRING:
            return self.string(), None
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                if count * size > len(self.buf):
                    raise ModelLoadError(self.path, "corrupt", f"array {key} of {count} items")
                self.take(count * size)
            elif etype == _STRING:
                if count > len(self.buf) // 8:
                    raise ModelLoadError(self.path, "corrupt", f"array {key} of {count} strings")
                for _ in range(count):
                    self.skip_string()
            else:
                raise ModelLoadError(self.path, "corrupt", f"array {key} has element type {etype}")
            return None, count
        raise ModelLoadError(self.path, "corrupt", f"key {key} has unknown value type {vtype}")


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Validate a GGUF file's header and tensor table; raise ModelLoadError on any defect."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        raise ModelLoadError(p, "missing", "no such file") from None
    except IsADirectoryError:
        raise ModelLoadError(p, "not_gguf", "is a directory") from None
    except OSError as exc:
        raise ModelLoadError(p, "unreadable", exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(p, "not_gguf", "not a regular file")
        size = st.st_size
        if size < 24:
            raise ModelLoadError(p, "truncated" if size else "empty", f"only {size} bytes")
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, p), size)
    finally:
        os.close(fd)


def _parse(cur: _Cursor, size: int) -> GGUFHeader:
    p = cur.path
    if cur.take(4) != _MAGIC:
        raise ModelLoadError(p, "not_gguf", "the file does not start with the GGUF magic")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ModelLoadError(p, "unsupported_version", f"GGUF version {version}")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
        raise ModelLoadError(p, "corrupt", f"{n_tensors} tensors, {n_kv} metadata keys")
    meta: dict[str, Any] = {}
    arrays: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        value, count = cur.value(vtype, key)
        if count is None:
            meta[key] = value
        else:
            arrays[key] = count
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(p, "corrupt", "no general.architecture key")
    infos: list[tuple[str, int, int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise ModelLoadError(p, "corrupt", f"tensor {name} has {n_dims} dimensions")
        n_el = 1
        for _ in range(n_dims):
            n_el *= cur.unpack("<Q")
        ttype = cur.unpack("<I")
        offset = cur.unpack("<Q")
        infos.append((name, n_el, ttype, offset))
    align = int(meta.get("general.alignment", 32)) or 32
    data_start = (cur.pos + align - 1) // align * align
    for name, n_el, ttype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ModelLoadError(p, "corrupt", f"tensor {name} has unknown type {ttype}") from None
        end = data_start + offset + n_el // block * type_size
        if end > size:
            raise ModelLoadError(
                p, "truncated", f"tensor {name} ends at byte {end} but the file has {size} bytes"
            )
    n_params = sum(n_el for _, n_el, _, _ in infos)
    return GGUFHeader(p, version, arch, meta, arrays, n_tensors, size, n_params)
