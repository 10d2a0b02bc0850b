"""Generate the gRPC API's Python code from ``ferrous.proto`` (checked in beside it).

``python -m gateway.grpcapi.generate`` rewrites ``ferrous_pb2.py``, ``ferrous_pb2.pyi``
and ``ferrous_pb2_grpc.py`` with grpcio-tools' protoc; ``--check`` exits 1 when the
checked-in files differ from what it would write (the test suite runs it).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

__all__ = ["GENERATED", "generate", "main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GENERATED = ("ferrous_pb2.py", "ferrous_pb2.pyi", "ferrous_pb2_grpc.py")


def generate(out: Path) -> None:
    """Write the generated files under ``out`` (as ``out/gateway/grpcapi/...``)."""
    from grpc_tools import protoc  # a development tool: imported only here

    proto = HERE.relative_to(ROOT) / "ferrous.proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / proto),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        made = Path(tmp) / HERE.relative_to(ROOT)
        stale = [n for n in GENERATED if (made / n).read_bytes() != _read(HERE / n)]
        if "--check" in args:
            for name in stale:
                print(f"{name} is not what ferrous.proto generates", file=sys.stderr)
            return 1 if stale else 0
        for name in GENERATED:
            (HERE / name).write_bytes((made / name).read_bytes())
    return 0


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


if __name__ == "__main__":
    raise SystemExit(main())
