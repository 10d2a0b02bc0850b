"""How far batching can go on a graph, measured on the bare onnxruntime session.

    python -m bench.onnx_ceiling MODEL_FOLDER [--threads N] [--past 100] [--rounds 30] [--json]

The engine's batched decode cannot scale better than the session it drives.
This measures that session alone — no worker, no Python sampling, no
prompt reading — so the engine's figures in :mod:`bench.onnx` can be read
against it in the same run:

* ``step_ms`` — one decode step (one new token per row) at 1, 2, 4 and 8
  rows, every row ``--past`` tokens into its sequence, keys and values in
  one buffer bound as both past and present (the layout the backend uses
  for ``GroupQueryAttention`` graphs), the engine's session options.
  Rounds interleave the batch sizes so that a machine drifting during the
  run shifts them all alike; medians. ``batch4_speedup`` = 4 * step(1) /
  step(4): the batch-4 aggregate over the batch-1 one.
* ``matmul_nbits`` — the same for a chain of 4-bit ``MatMulNBits``
  (``accuracy_level=4``, blocks of 32) of the graph's FFN shapes, one to
  eight rows: the kernel that holds most of a step's time. Its
  ``m4_over_m1`` is what four rows cost against one; the step's
  ``batch4_speedup`` cannot be much above ``4 / m4_over_m1``.

Only graphs with ``GroupQueryAttention`` (the fast graphs) are measured;
for others the result says why not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.backends.base import LoadParams
from engine.backends.onnx_entry import OnnxOptions
from engine.backends.onnxsession import session_options

__all__ = ["LEVELS", "ffn_shape", "graph_ceiling", "matmul_nbits_scaling"]

LEVELS = (1, 2, 4, 8)
_GQA = "GroupQueryAttention"


def _session(model: str | bytes, threads: int, spinning: bool) -> ort.InferenceSession:
    """A CPU session with the options the engine's ONNX backend would give it."""
    opts = session_options(threads, OnnxOptions(spinning=spinning))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _interleaved(run: dict[int, Any], rounds: int, repeats: int = 3) -> dict[int, float]:
    """Median seconds per call of each ``run[level]()``, levels interleaved round by round."""
    times: dict[int, list[float]] = {level: [] for level in run}
    for r in range(rounds + 1):
        for level, call in run.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                if r:  # the first round warms up
                    times[level].append(time.perf_counter() - t0)
    return {level: statistics.median(ts) for level, ts in times.items()}


def _summary(seconds: dict[int, float]) -> dict[str, object]:
    return {
        "step_ms": {str(n): round(s * 1000, 2) for n, s in seconds.items()},
        "aggregate_tok_s": {str(n): round(n / s, 1) for n, s in seconds.items()},
        "batch4_speedup": round(4 * seconds[1] / seconds[4], 2),
    }


def graph_ceiling(
    folder: Path, *, threads: int, spinning: bool, past: int = 100, rounds: int = 30
) -> dict[str, object]:
    """Decode-step times of the folder's graph at 1/2/4/8 rows on a bare session."""
    import onnx

    path = folder / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    if not any(node.op_type == _GQA for node in graph.node):
        return {"measured": False, "why": f"the graph has no {_GQA} (not a fast graph)"}
    session = _session(str(path), threads, spinning)
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    _, kv_heads, _, head_dim = pasts[0].shape
    vocab = session.get_outputs()[0].shape[-1]
    capacity = 1 << max(8, (past + 1).bit_length())
    keep: list[object] = []  # the arrays behind each binding must outlive it

    def binding(rows: int) -> Any:
        ids = np.full((rows, 1), 42, np.int64)
        mask = np.ones((rows, past + 1), np.int64)
        logits = np.zeros((rows, 1, vocab), np.float32)
        bind = session.io_binding()
        bind.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        bind.bind_cpu_input("input_ids", ids)
        bind.bind_cpu_input("attention_mask", mask)
        keep.extend((ids, mask, logits))
        for inp in pasts:
            buf = np.zeros((rows, kv_heads, capacity, head_dim), np.float32)
            keep.append(buf)
            shape = list(buf.shape)
            bind.bind_input(inp.name, "cpu", 0, np.float32, shape, buf.ctypes.data)
            present = inp.name.replace("past_key_values.", "present.")
            bind.bind_output(present, "cpu", 0, np.float32, shape, buf.ctypes.data)
        return bind

    bindings = {n: binding(n) for n in LEVELS}
    seconds = _interleaved(
        {n: (lambda b=b: session.run_with_iobinding(b)) for n, b in bindings.items()}, rounds
    )
    return {"measured": True, "past": past, **_summary(seconds)}


def matmul_nbits_scaling(
    hidden: int, ffn: int, *, threads: int, spinning: bool, pairs: int = 10, rounds: int = 30
) -> dict[str, object]:
    """Run times of a chain of 4-bit ``MatMulNBits`` at 1/2/4/8 rows.

    The chain is ``pairs`` times an up projection (hidden → ffn) and a down
    one (ffn → hidden), each with its own weights, so that one call's
    overhead does not hide the kernel's own scaling.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = []
    initializers = []
    name = "x"
    for i in range(2 * pairs):
        k, n = (hidden, ffn) if i % 2 == 0 else (ffn, hidden)
        weights = rng.integers(0, 256, size=(n, k // 32, 16), dtype=np.uint8)
        scales = (rng.random((n, k // 32), dtype=np.float32) * 0.02).astype(np.float32)
        initializers += [
            helper.make_tensor(f"b{i}", TensorProto.UINT8, weights.shape, weights.tobytes(), True),
            helper.make_tensor(f"s{i}", TensorProto.FLOAT, scales.shape, scales.tobytes(), True),
        ]
        out = "y" if i == 2 * pairs - 1 else f"h{i}"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [name, f"b{i}", f"s{i}"],
                [out],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=32,
                accuracy_level=4,
            )
        )
        name = out
    graph = helper.make_graph(
        nodes,
        "matmul_nbits_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", hidden])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = _session(model.SerializeToString(), threads, spinning)
    inputs = {m: rng.standard_normal((m, hidden)).astype(np.float32) for m in LEVELS}
    seconds = _interleaved(
        {m: (lambda x=x: session.run(None, {"x": x})) for m, x in inputs.items()}, rounds
    )
    return {
        "shape": f"{pairs} x ({hidden}x{ffn}, {ffn}x{hidden})",
        "run_ms": {str(m): round(s * 1000, 3) for m, s in seconds.items()},
        "m4_over_m1": round(seconds[4] / seconds[1], 2),
    }


def ffn_shape(folder: Path) -> tuple[int, int]:
    """(hidden, ffn) of a decoder folder, from its config.json."""
    config = json.loads((folder / "config.json").read_text())
    return int(config["hidden_size"]), int(config["intermediate_size"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.onnx_ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="an ONNX decoder folder (a fast graph)")
    parser.add_argument("--threads", type=int, default=LoadParams().n_threads)
    parser.add_argument(
        "--spinning", action=argparse.BooleanOptionalAction, default=OnnxOptions().spinning
    )
    parser.add_argument("--past", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, object] = {
        "graph": graph_ceiling(
            args.folder,
            threads=args.threads,
            spinning=args.spinning,
            past=args.past,
            rounds=args.rounds,
        )
    }
    hidden, ffn = ffn_shape(args.folder)
    result["matmul_nbits"] = matmul_nbits_scaling(
        hidden, ffn, threads=args.threads, spinning=args.spinning
    )
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
