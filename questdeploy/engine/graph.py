"""Read-only views of an ONNX graph that the lint, the builder and the manifest share.

``GraphIndex`` answers the questions TensorRT's Q/DQ rules ask about a tensor: who produces it, who
consumes it, is it a build-time constant, what element type does it carry, where does it come from once
layout-only ops are skipped. ``io_signature`` reads the model's inputs and outputs (names, dtypes, dims
with symbolic names kept) and ``detect_form`` tells an ``ort``-form export (Gather scales) from a
``trt``-form one (constant scales) or a float graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
QDQ_OPS = frozenset({QUANTIZE, DEQUANTIZE})
LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Ops a DequantizeLinear output may pass through and still count as "the input is quantized": TensorRT
# propagates DQ forward (and Q backward) through layout-only ops and MaxPool.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "Cast"})
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
META_PREFIX = "questdeploy."

INT4_TYPES = frozenset({TensorProto.INT4, TensorProto.UINT4})
INT8_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8})
FP8_TYPES = frozenset(
    getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(TensorProto, n)
)
FP4_TYPES = frozenset(getattr(TensorProto, n) for n in ("FLOAT4E2M1",) if hasattr(TensorProto, n))
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def type_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type{elem_type}"


def load_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        from .errors import EngineError

        raise EngineError(f"ONNX file not found: {path}", hint="pass the path of an exported .onnx file")
    return onnx.load(str(path))  # loads external data that sits beside the file


def node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    if node.name:
        return node.name
    out = node.output[0] if node.output else "?"
    return f"{node.op_type}({out})" if index is None else f"{node.op_type}#{index}({out})"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphIndex:
    """Producers, consumers, constants and element types of one (top-level) graph."""

    def __init__(self, model: onnx.ModelProto, infer_shapes: bool = True):
        self.model = model
        if infer_shapes:
            try:
                inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
            except Exception:  # inference is a help, never a requirement
                inferred = model
        else:
            inferred = model
        self.graph = model.graph
        self.opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
        self.opset = self.opsets.get("", 0)
        graph_inputs = {i.name for i in self.graph.input}
        # initializers that are also graph inputs can be overridden at run time: not constants
        self.initializers = {t.name: t for t in self.graph.initializer if t.name not in graph_inputs}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.index_of: dict[int, int] = {}
        for i, n in enumerate(self.graph.node):
            self.index_of[id(n)] = i
            for o in n.output:
                if o:
                    self.producers[o] = n
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(n)
        self._types: dict[str, int] = {}
        self._shapes: dict[str, list] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self._types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        for t in self.graph.initializer:
            self._types[t.name] = t.data_type
            self._shapes[t.name] = list(t.dims)

    # -- nodes ---------------------------------------------------------------------------------
    def nodes(self, *op_types: str) -> Iterator[onnx.NodeProto]:
        for n in self.graph.node:
            if not op_types or (n.op_type in op_types and n.domain in DEFAULT_DOMAINS):
                yield n

    def label(self, node: onnx.NodeProto) -> str:
        return node_label(node, self.index_of.get(id(node)))

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default=None):
        return _attr(node, name, default)

    # -- constants -------------------------------------------------------------------------------
    def is_constant(self, name: str, _depth: int = 0) -> bool:
        """True for initializers, Constant outputs, and Cast/Identity/Reshape chains of those."""
        if not name:
            return False
        if name in self.initializers:
            return True
        p = self.producers.get(name)
        if p is None or _depth > 8:
            return False
        if p.op_type == "Constant":
            return True
        if p.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze"):
            return all(self.is_constant(x, _depth + 1) for x in p.input if x)
        return False

    def const_value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            try:
                return numpy_helper.to_array(self.initializers[name])
            except Exception:
                return None
        p = self.producers.get(name)
        if p is not None and p.op_type == "Constant":
            t = _attr(p, "value")
            if isinstance(t, onnx.TensorProto):
                return numpy_helper.to_array(t)
            for key in ("value_float", "value_int"):
                v = _attr(p, key)
                if v is not None:
                    return np.asarray(v)
            for key in ("value_floats", "value_ints"):
                v = _attr(p, key)
                if v is not None:
                    return np.asarray(list(v))
        if p is not None and p.op_type in ("Cast", "Identity") and p.input:
            return self.const_value(p.input[0])
        return None

    # -- types and shapes ---------------------------------------------------------------------------
    def elem_type(self, name: str) -> int | None:
        if name in self._types:
            return self._types[name]
        p = self.producers.get(name)
        if p is None:
            return None
        if p.op_type == QUANTIZE:
            return self.quantized_type(p)
        if p.op_type == "Constant":
            t = _attr(p, "value")
            if isinstance(t, onnx.TensorProto):
                return t.data_type
        if p.op_type == "Cast":
            return _attr(p, "to")
        if p.op_type in LAYOUT_OPS and p.input:
            return self.elem_type(p.input[0])
        return None

    def shape(self, name: str) -> list | None:
        if name in self._shapes:
            return self._shapes[name]
        v = self.const_value(name)
        return list(v.shape) if v is not None else None

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The integer/low-precision type a Q produces or a DQ consumes."""
        if node.op_type == QUANTIZE:
            out_dtype = _attr(node, "output_dtype", 0)
            if out_dtype:
                return out_dtype
            if len(node.input) > 2 and node.input[2]:
                return self.elem_type(node.input[2])
            return TensorProto.UINT8  # the ONNX default when neither is given
        if node.op_type == DEQUANTIZE:
            t = self.elem_type(node.input[0])
            if t is None and len(node.input) > 2 and node.input[2]:
                t = self.elem_type(node.input[2])
            return t
        return None

    def is_activation(self, qdq: onnx.NodeProto) -> bool:
        """A Q/DQ on a run-time tensor (not on a weight initializer, nor a DQ right after a weight's Q)."""
        x = qdq.input[0]
        if self.is_constant(x):
            return False
        p = self.producers.get(x)
        if qdq.op_type == DEQUANTIZE and p is not None and p.op_type == QUANTIZE and p.domain in DEFAULT_DOMAINS:
            return self.is_activation(p)
        return True

    # -- walking ------------------------------------------------------------------------------------
    def source_through_layout(self, name: str, max_depth: int = 8) -> onnx.NodeProto | None:
        """The first producer of ``name`` that is not a layout-only op (None for graph inputs/constants)."""
        for _ in range(max_depth):
            p = self.producers.get(name)
            if p is None or p.op_type not in LAYOUT_OPS or not p.input:
                return p
            name = p.input[0]
        return None

    def comes_from_dq(self, name: str) -> bool:
        p = self.source_through_layout(name)
        return p is not None and p.op_type == DEQUANTIZE

    def sinks_through_layout(self, name: str, max_depth: int = 8) -> list[onnx.NodeProto]:
        """Consumers of ``name`` after skipping layout-only ops."""
        out: list[onnx.NodeProto] = []
        frontier = [(name, 0)]
        while frontier:
            t, d = frontier.pop()
            for c in self.consumers.get(t, []):
                if c.op_type in LAYOUT_OPS and d < max_depth and c.output:
                    frontier.append((c.output[0], d + 1))
                else:
                    out.append(c)
        return out

    def graph_output_names(self) -> set[str]:
        return {o.name for o in self.graph.output}


# --------------------------------------------------------------------------------------------------
# inputs / outputs


@dataclass(frozen=True)
class TensorSig:
    name: str
    dtype: str  # numpy-style name: float32, float16, int64, ...
    dims: tuple  # ints for static dims, str (symbolic name) or None (unknown) for dynamic ones

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": [d if isinstance(d, int) else (d or -1) for d in self.dims]}


_NP_NAMES = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool",
    TensorProto.UINT16: "uint16", TensorProto.UINT32: "uint32", TensorProto.UINT64: "uint64",
}


def _sig(vi: onnx.ValueInfoProto) -> TensorSig:
    tt = vi.type.tensor_type
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return TensorSig(vi.name, _NP_NAMES.get(tt.elem_type, type_name(tt.elem_type)), tuple(dims))


def io_signature(model: onnx.ModelProto) -> tuple[list[TensorSig], list[TensorSig]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [_sig(v) for v in model.graph.input if v.name not in inits]
    outputs = [_sig(v) for v in model.graph.output]
    return inputs, outputs


# --------------------------------------------------------------------------------------------------
# form and metadata


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def questdeploy_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {k[len(META_PREFIX):]: v for k, v in metadata(model).items() if k.startswith(META_PREFIX)}


FORMS = ("fp", "ort", "trt", "ort-int")


@dataclass
class FormInfo:
    form: str  # "fp" | "ort" | "trt" | "ort-int"
    source: str  # "metadata" | "graph" | "override"
    qdq_nodes: int = 0
    runtime_scales: int = 0  # Q/DQ whose scale is not a build-time constant
    notes: list[str] = field(default_factory=list)


def detect_form(model: onnx.ModelProto, override: str | None = None, index: GraphIndex | None = None) -> FormInfo:
    """Which export form a model is in: metadata ``questdeploy.form`` first, then the graph itself.

    Graph rule: any MatMulInteger / MatMulIntegerToFloat => ``ort-int``; else any Q/DQ whose scale is not a
    build-time constant => ``ort``; Q/DQ all constant => ``trt``; no Q/DQ => ``fp``. A metadata value that
    contradicts the graph is noted (the graph wins for the lint).
    """
    ix = index or GraphIndex(model, infer_shapes=False)
    qdq = [n for n in ix.nodes(QUANTIZE, DEQUANTIZE)]
    runtime = [n for n in qdq if len(n.input) > 1 and not ix.is_constant(n.input[1])]
    graph_form = "fp" if not qdq else ("ort" if runtime else "trt")
    if qdq and any(n.op_type in ("MatMulInteger", "MatMulIntegerToFloat") for n in ix.graph.node):
        graph_form = "ort-int"
    info = FormInfo(graph_form, "graph", len(qdq), len(runtime))
    meta_form = questdeploy_metadata(model).get("form")
    if meta_form in FORMS:
        if meta_form != graph_form:
            info.notes.append(f"metadata says form '{meta_form}' but the graph looks like '{graph_form}'")
        info.form, info.source = meta_form, "metadata"
    if override:
        if override not in FORMS:
            from .errors import ProfileError

            raise ProfileError(f"unknown ONNX form {override!r}", hint=f"use one of {', '.join(FORMS)}")
        info.form, info.source = override, "override"
    return info


def timestep_table(model: onnx.ModelProto) -> dict | None:
    """The timestep -> group bins (edges) and the per-group scale tables the graph carries, if any.

    Edges come from metadata ``questdeploy.timestep_edges`` (or the embedded quant spec); scale tables are
    the 1-D float initializers read by ``Gather`` nodes (``Gather(table, group)``), keyed by initializer name.
    """
    meta = questdeploy_metadata(model)
    edges = None
    for key in ("timestep_edges",):
        if meta.get(key):
            try:
                edges = json.loads(meta[key])
            except ValueError:
                edges = None
    if edges is None and meta.get("quant_spec"):
        try:
            edges = json.loads(meta["quant_spec"]).get("timestep_edges")
        except (ValueError, AttributeError):
            edges = None
    ix = GraphIndex(model, infer_shapes=False)
    tables: dict[str, list[float]] = {}
    for n in ix.nodes("Gather"):
        data = n.input[0]
        t = ix.initializers.get(data)
        if t is not None and len(t.dims) == 1 and t.data_type in FLOAT_TYPES:
            tables[data] = [float(v) for v in numpy_helper.to_array(t)]
    if edges is None and not tables:
        return None
    return {
        "edges": edges,
        "num_groups": (len(edges) - 1) if edges else None,
        "group_tensor": meta.get("group_tensor"),
        "static_scales": meta.get("static_scales"),
        "scale_tables": tables,
    }


def iter_quant_summary(ix: GraphIndex) -> Iterable[tuple[str, str, int | None]]:
    """(kind, label, quantized type) for every Q/DQ: kind is 'weight' or 'activation'."""
    for n in ix.nodes(QUANTIZE, DEQUANTIZE):
        yield ("activation" if ix.is_activation(n) else "weight"), ix.label(n), ix.quantized_type(n)
