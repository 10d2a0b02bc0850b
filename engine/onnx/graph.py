"""One builder for every ONNX graph the project writes.

The project writes its graphs itself, with ``onnx.helper`` and numpy, rather
than exporting them from a training framework: the Llama decoder
(:mod:`engine.onnx.decoder`), its fused variant (:mod:`engine.onnx.fused`) and
the BERT encoder (:mod:`engine.onnx.bert_convert`). Each builder is written to
read like the forward pass it encodes (``x = g.op("Add", [x, h])``), and
:class:`GraphBuilder` holds what they all need for that:

* names: every node and every generated tensor gets a unique, readable name
  (``MatMul_12``, ``MatMul_12/out``), so onnxruntime's errors and a graph
  viewer point at one place;
* initializers added once per name, so a shape constant used by every layer
  is stored once;
* the target opset, which decides whether a builder may use a newer native
  op or must compose it from older ones.

One builder rather than one per graph keeps those rules the same everywhere,
which the GGUF converter relies on: it recognises weights by their
initializers' names and shapes (:mod:`engine.onnx.convert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

__all__ = ["MS_DOMAIN", "GraphBuilder"]

MS_DOMAIN: Final = "com.microsoft"  # onnxruntime's contrib operators


class GraphBuilder:
    """Collects the nodes and initializers of one graph, with unique, readable names.

    ``nodes`` and ``initializers`` are in the order they were added (a valid
    topological order, since an op can only name tensors that already exist);
    :meth:`graph` wraps them with the graph's inputs and outputs.
    """

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._count = 0

    # -- constants --------------------------------------------------------------------------

    def const(self, name: str, value: npt.ArrayLike, dtype: type[np.generic]) -> str:
        """An initializer ``name`` holding ``value`` as ``dtype``; returns ``name``.

        Added on first use only: a later call with the same name reuses the
        first value, so shared constants can be asked for wherever needed.
        """
        if name not in self._names:
            self._names.add(name)
            array = np.asarray(value, dtype=dtype)
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes, slice bounds)."""
        return self.const("const.i64_" + "_".join(str(v) for v in values), list(values), np.int64)

    def scalar(self, value: int) -> str:
        """A 0-D int64 constant."""
        return self.const(f"const.i64_scalar_{value}", value, np.int64)

    def f32(self, name: str, value: float) -> str:
        """A 0-D float32 constant named ``const.<name>``."""
        return self.const(f"const.{name}", value, np.float32)

    # -- nodes ------------------------------------------------------------------------------

    def next_name(self, op_type: str) -> str:
        """The name the next node will get (for outputs named after their node)."""
        return f"{op_type}_{self._count}"

    def op(
        self, op_type: str, inputs: Sequence[str], *, output: str | None = None, **attrs: Any
    ) -> str:
        """A one-output node; returns its output, ``output`` if given (a graph output) or generated."""
        name = output or f"{self.next_name(op_type)}/out"
        self.out(op_type, inputs, [name], **attrs)
        return name

    def ops(self, op_type: str, inputs: Sequence[str], n_out: int, **attrs: Any) -> list[str]:
        """A node with ``n_out`` generated outputs (``Split``), returned in order."""
        base = self.next_name(op_type)
        names = [f"{base}/out{k}" for k in range(n_out)]
        self.out(op_type, inputs, names, **attrs)
        return names

    def out(
        self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any
    ) -> None:
        """A node with given output names (graph outputs, shared tensors, unused "" slots).

        ``attrs`` are the node's attributes, plus ``domain`` for contrib ops.
        """
        name = self.next_name(op_type)
        self._count += 1
        self.nodes.append(
            helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)
        )

    def graph(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
    ) -> onnx.GraphProto:
        """The graph of everything added so far."""
        return helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.initializers)
