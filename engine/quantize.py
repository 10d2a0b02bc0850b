"""Quantizing a GGUF model with llama.cpp's own quantizer (``ferrous create --quantize``).

The types are llama.cpp's (``q4_K_M``, ``q5_K_M``, ``q8_0``, ...; any case,
as Ollama takes them). Only an unquantized model (f32, f16 or bf16) is
quantized: requantizing an already quantized one loses twice, and llama.cpp
refuses it too; the refusal says what the input is. The quantizer runs in its
own process (:func:`quantize_in_subprocess`, ``python -m engine.quantize``):
it holds a whole model in memory for a while, and a crash in native code
must not take the server with it. Its per-tensor lines become progress.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from engine.gguf_header import read_gguf_header
from protocol.errors import BadRequest, EngineError

__all__ = [
    "ONNX_Q4",
    "QUANT_TYPES",
    "check_quantizable",
    "convert_in_subprocess",
    "quant_type",
    "quantize_in_subprocess",
    "run_child",
]

# Not a llama.cpp type: the ONNX converter's 4-bit graph (MatMulNBits, fused attention),
# for the ONNX backend, from any GGUF it can read (quantized ones are dequantized first).
ONNX_Q4 = "onnx-q4"

# Ollama's and llama.cpp's names for the types a model can be quantized to.
QUANT_TYPES = (
    "q2_K", "q3_K_S", "q3_K_M", "q3_K_L", "q4_0", "q4_1", "q4_K_S", "q4_K_M",
    "q5_0", "q5_1", "q5_K_S", "q5_K_M", "q6_K", "q8_0", "iq4_NL", "iq4_XS",
)  # fmt: skip
_UNQUANTIZED = {0: "F32", 1: "F16", 32: "BF16"}  # general.file_type values
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quant_type(name: str) -> str:
    """The canonical spelling of quantization type ``name``; BadRequest when unknown."""
    for known in (*QUANT_TYPES, ONNX_Q4):
        if known.lower() == name.strip().lower():
            return known
    known = ", ".join((*QUANT_TYPES, ONNX_Q4))
    raise BadRequest(f"unknown quantization type {name!r}; one of {known}")


def check_quantizable(path: Path) -> str:
    """The type of the unquantized GGUF at ``path`` ("F16", ...); BadRequest otherwise."""
    header = read_gguf_header(str(path))
    ftype = header.metadata.get("general.file_type")
    if isinstance(ftype, int) and ftype not in _UNQUANTIZED:
        import gguf

        try:
            what = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_")
        except ValueError:
            what = f"file type {ftype}"
        raise BadRequest(
            f"the model is already quantized ({what}); quantize from an f32, f16 or bf16 GGUF"
        )
    return _UNQUANTIZED.get(ftype if isinstance(ftype, int) else 0, "F32")


def quantize_file(src: Path, dst: Path, qtype: str, threads: int) -> None:
    """``src`` quantized to ``qtype`` into ``dst`` (in this process; see the module)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type(qtype).upper()}")
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise EngineError(f"llama.cpp could not quantize the model (status {status})")


async def run_child(
    args: list[str], on_line: Callable[[str], None] | None = None
) -> tuple[int, list[str]]:
    """``python -m ARGS...`` in a child process: its exit code and last lines of stderr.

    Each stderr line goes to ``on_line`` as it comes. However this ends (a cancel,
    an error reading, the caller's exception), a child still running is killed and
    reaped before the call returns: work the caller gave up on never runs on.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    tail: list[str] = []
    try:
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail = [*tail[-9:], line]
            if on_line is not None:
                on_line(line)
        return await proc.wait(), tail
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())


async def quantize_in_subprocess(
    src: Path,
    dst: Path,
    qtype: str,
    *,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run :func:`quantize_file` in a child process, reporting tensors done of all."""
    threads = threads or max(1, min(8, os.cpu_count() or 1))

    def line(text: str) -> None:
        match = _PROGRESS.search(text)
        if match and progress is not None:
            progress(int(match.group(1)), int(match.group(2)))

    try:
        code, tail = await run_child(
            ["engine.quantize", str(src), str(dst), qtype, str(threads)], line
        )
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    if code != 0:
        dst.unlink(missing_ok=True)
        raise EngineError("quantizing failed: " + " | ".join(tail[-3:]))


async def convert_in_subprocess(src: Path, dst: Path, *, q4: bool, fused: bool) -> None:
    """The ONNX converter (``python -m engine.onnx.convert``) writing ``dst`` from the GGUF
    ``src`` in a child process: it holds the whole model as float32 arrays for a
    while, which is no work for the gateway's own threads. EngineError with the
    converter's words when it refuses the file."""
    flags = [*(["--q4"] if q4 else []), *(["--fused"] if fused else [])]
    code, tail = await run_child(["engine.onnx.convert", str(src), str(dst), *flags])
    if code != 0:
        said = [x.removeprefix("error: ") for x in tail if x.startswith("error: ")]
        raise EngineError((said or tail[-3:] or ["the converter failed"])[-1])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print("usage: python -m engine.quantize SRC DST TYPE THREADS", file=sys.stderr)
        return 2
    try:
        quantize_file(Path(args[0]), Path(args[1]), args[2], int(args[3]))
    except (BadRequest, EngineError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
