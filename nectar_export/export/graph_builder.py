"""A small ONNX graph builder with deterministic names (in the manner of onnxruntime-genai's).

Every node is named by its place in the model, `/model/layers.3/attn/qk_rope/Mul`, and its
first output is `<node name>/output_0`; initializers are named like the weights they hold
(`model.layers.3.attn.qkv_proj.weight`). The same model and options give the same graph, byte
for byte, so bundles diff cleanly and node names can be quoted in docs and profiles.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # readable by ONNX Runtime >= 1.16 (JetPack 6 ships 1.16+); onnx >= 1.23 would write 14


def portable_model(graph: onnx.GraphProto, opset_imports: list, **kw) -> onnx.ModelProto:
    """helper.make_model pinned to IR_VERSION, so any ONNX Runtime this project supports loads it."""
    m = helper.make_model(graph, opset_imports=opset_imports, **kw)
    m.ir_version = IR_VERSION
    return m


NEG = -1e9  # additive mask value: finite, so a row with no visible key stays NaN-free
_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def onnx_dtype(dtype) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


class GraphBuilder:
    """Accumulates nodes, initializers and graph inputs/outputs; `model()` assembles them."""

    def __init__(self, opset: int = OPSET):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.custom_domains: dict[str, int] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name in graph: {name}")
        self._names.add(name)
        return name

    def has(self, name: str) -> bool:
        """Whether a node output, input or initializer of this name exists (for values built once)."""
        return name in self._names

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def rename(self, old: str, new: str) -> str:
        """Give node output `old` the name `new` everywhere (graph outputs such as `present.0.key`
        are then written by the node computing them, without an Identity node per output)."""
        if old not in self._names or any(old == i.name for i in self.inputs) or any(old == t.name for t in self.initializers):
            raise ValueError(f"rename: {old!r} is not a node output")
        self._claim(new)
        self._names.discard(old)
        for node in self.nodes:
            for seq in (node.input, node.output):
                for j, x in enumerate(seq):
                    if x == old:
                        seq[j] = new
        return new

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer holding `array` (a weight; saved as external data when large)."""
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C", copy=True), self._claim(name)))  # keeps 0-d
        return name

    def const(self, array, dtype=np.int64) -> str:
        """A small constant (shape vectors, axes, scalars), shared when the same value recurs."""
        a = np.asarray(array, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            label = "_".join(str(x) for x in a.ravel()[:8]).replace("-", "m").replace(".", "p")
            self._consts[key] = self.weight(f"/const/{a.dtype.name}/{list(a.shape)}/{label}/{len(self._consts)}", a)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[bool] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Add node `name` (its path in the model, e.g. '/model/layers.0/attn/Softmax');
        returns its output name, or a list of them when `outputs` > 1. `outputs` as a list of
        flags: which of the node's optional outputs exist (a skipped one gets the name "")."""
        want = [True] * outputs if isinstance(outputs, int) else list(outputs)
        outs = [f"{name}/output_{i}" if w else "" for i, w in enumerate(want)]
        for o in outs:
            if o:
                self._claim(o)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._claim(name), domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in sorted(self.custom_domains.items())]
        return portable_model(graph, opsets, producer_name="nectar", doc_string=doc)
