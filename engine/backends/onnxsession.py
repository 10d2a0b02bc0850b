"""Opening ONNX model folders: onnxruntime session options and what a graph or config says.

Shared by the ONNX decoder backend (:mod:`engine.backends.onnxrt`) and the
benchmarks that time its graphs: :func:`session_options` turns the thread
count and ``[onnx]`` settings into onnxruntime's options;
:func:`read_json` reads a folder's optional JSON files; :func:`graph_opsets`
and :func:`has_op` read a graph's header without its weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from engine.backends.onnx_entry import OnnxOptions
from protocol.errors import BadRequest, ModelLoadError

__all__ = [
    "PROVIDER_NAMES",
    "choose_providers",
    "graph_opsets",
    "has_op",
    "open_session",
    "providers_for",
    "read_json",
    "session_options",
]

log = logging.getLogger("ferrous.engine")

# Short names for onnxruntime's execution providers.
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_CPU = "CPUExecutionProvider"


def choose_providers(
    requested: Sequence[str], available: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The providers to ask onnxruntime for, in ``requested``'s order, the CPU last; and
    the requested ones this onnxruntime does not have (pure)."""
    chosen: list[str] = []
    missing: list[str] = []
    for name in requested:
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full in available:
            if full not in chosen:
                chosen.append(full)
        else:
            missing.append(name)
    if _CPU in chosen:
        chosen.remove(_CPU)
    return [*chosen, _CPU], missing


def providers_for(o: OnnxOptions, what: str) -> list[str | tuple[str, dict[str, Any]]]:
    """:func:`choose_providers` for the ``[onnx]`` settings, with a warning naming what was
    asked for and is not installed, and TensorRT's engine cache when it is set."""
    chosen, missing = choose_providers(o.providers, ort.get_available_providers())
    if missing:
        log.warning(
            "%s: execution provider %s not available in this onnxruntime (it has %s); using %s",
            what,
            ", ".join(missing),
            ", ".join(ort.get_available_providers()),
            ", ".join(chosen),
        )
    out: list[str | tuple[str, dict[str, Any]]] = []
    for name in chosen:
        if name == "TensorrtExecutionProvider" and o.tensorrt_cache:
            cache = {"trt_engine_cache_enable": True, "trt_engine_cache_path": o.tensorrt_cache}
            out.append((name, cache))
        else:
            out.append(name)
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A folder's JSON file as a dict ({} when absent); ModelLoadError ``corrupt`` if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(str(path), "corrupt", f"cannot read it: {exc}") from None
    return data if isinstance(data, dict) else {}


def graph_opsets(path: Path) -> str:
    """The operator sets a graph imports, for error messages (weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a graph that does not parse: say nothing more precise
        return "an operator set"
    return ", ".join(f"{e.domain or 'ai.onnx'} opset {e.version}" for e in model.opset_import)


def has_op(path: Path, op_type: str) -> bool:
    """Whether the graph (weights not read) holds a node of ``op_type``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type == op_type for node in model.graph.node)


_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def session_options(threads: int, o: OnnxOptions) -> ort.SessionOptions:
    """Session options for ``threads`` intra-op threads and the ``[onnx]`` settings."""
    if o.graph_optimization not in _OPT_LEVELS:
        raise BadRequest(
            f"onnx graph_optimization must be one of {', '.join(_OPT_LEVELS)}, "
            f"not {o.graph_optimization!r}"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[o.graph_optimization]
    opts.enable_cpu_mem_arena = o.memory_arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if o.spinning else "0")
    # Spin only while a run is under way: between steps the worker's own
    # Python, the gateway and other workers need the cores.
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    return opts


def open_session(path: Path, params: Any) -> ort.InferenceSession:
    """A CPU session for the graph at ``path`` with ``params``' threads and ``[onnx]``
    options (a :class:`~engine.backends.base.LoadParams`); ModelLoadError when
    onnxruntime cannot load it."""
    opts = params.options if isinstance(params.options, OnnxOptions) else OnnxOptions()
    providers = providers_for(opts, str(path))
    try:
        return ort.InferenceSession(
            str(path), session_options(params.n_threads, opts), providers=providers
        )
    except Exception as exc:  # onnxruntime raises its own types for bad graphs
        raise ModelLoadError(
            str(path), "backend", f"onnxruntime could not load it ({exc})"
        ) from None
