"""Lowering a marked float graph into one of the deployable Q/DQ forms.

Input: the ONNX graph traced with marker nodes (``markers.py``) and the quantizer parameters of a
``QuantizedUNet`` (``params_from_model``). Output: a graph with standard ONNX operators only.

Forms (``form=``)
-----------------
``fp``
    Markers removed: the float graph (float weights).
``ort``
    For onnxruntime. Weights: INT8 / packed INT4 initializers -> ``DequantizeLinear`` (per output
    channel, or block-wise with ``block_size`` for INT4 Linear weights), zero point 0 (the optional input
    left out: ONNX's default is 0 of the weight type). Linear weights are stored transposed, ``(in, out)``,
    so the DQ feeds ``MatMul`` directly (axis 1 per channel; axis 0 block-wise). Activations:
    ``QuantizeLinear -> DequantizeLinear`` whose scale is ``Gather(scale_table, group)``; ``group`` is
    computed in the graph from the ``timestep`` input. Signed 8-bit activations are stored as **uint8 with
    zero point 128**: the same grid as symmetric int8 (``q_u8 = q_s8 + 128`` for every value), but the
    data type of MLAS's fast u8s8 kernels. Unsigned 8-bit (softmax probabilities): uint8, zero point 0.
    4-bit: int4 / uint4, zero point 0. 16-bit: int16 / uint16, zero point 0.
``trt``
    For TensorRT (every Q/DQ scale a build-time constant, int8 zero point 0). A per-timestep scale ``s``
    is moved out of the Q/DQ pair: ``Div(x, s[g]) -> Q(1) -> DQ(1) -> Conv/MatMul (no bias) -> Mul(s[g])
    -> Add(bias)``. The identity ``Q(x, s) = Q(x / s, 1)`` is exact, so this form is bit-identical to the
    ``ort`` form up to float re-association in the layer itself. ``Div`` (not ``Mul`` by ``1/s``): ONNX
    QuantizeLinear and ``questdeploy.quant.primitives.quantize`` divide, and ``x * (1/s)`` differs from
    ``x / s`` by one ulp often enough to flip LSBs. When the DQ output does not reach a Conv / MatMul /
    Gemm through layout-only ops (Transpose / Reshape / Squeeze / Unsqueeze / Flatten), the ``Mul(s)``
    goes right after the DQ instead (exact, but blocks fusion; reported in ``LowerReport.unfused``).
    TensorRT has no UINT8 / INT4-activation / 16-bit Q/DQ; such quantizers are emitted as in the ``ort``
    form (uint8/uint4/int4/16-bit, scale 1) and listed in ``LowerReport.trt_violations``.

``static_scales=True`` (any quantized form): one constant scale per activation quantizer, reduced over
the timestep groups by ``static_reduce``: ``"max"`` (default: the coarsest grid, never clips a value
that some group's grid represented) or ``"mean"``. Then no group subgraph is emitted and the ``trt``
form is plain constant-scale Q/DQ.

The group lookup: ``group = sum(t0 >= interior_edges)`` with ``t0 = timestep.reshape(-1)[0]``
(all batch elements share one timestep, as in ``QuantizedUNet.group_of``), computed as
``Reshape -> Gather -> GreaterOrEqual -> Cast(float) -> ReduceSum -> Cast(int32)``; float32 edges
(integer timesteps compare exactly).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .markers import MARKER_ATTR, MARKER_DOMAIN, MARKER_OP

FORMS = ("fp", "ort", "trt")
STATIC_REDUCE = ("max", "mean")
LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
LINEAR_INPUTS = {"Conv": (0,), "MatMul": (0, 1), "Gemm": (0, 1)}
META_PREFIX = "questdeploy."


class LoweringError(Exception):
    """The marked graph cannot be lowered (an internal inconsistency, not a user error)."""


# --------------------------------------------------------------------------------------------------
# quantizer parameters (duck-typed from questdeploy.quant modules)


@dataclass
class ActParams:
    key: str
    bits: int
    signed: bool
    scales: np.ndarray  # (G,) float32
    enabled: bool = True
    shifts: np.ndarray | None = None  # (G, *row shape broadcasting against the input) float32, or None


@dataclass
class WeightParams:
    key: str
    bits: int
    scale: np.ndarray  # (out,) or (out, in // block_size) float32
    block_size: int | None
    int_fn: Callable[[np.ndarray], np.ndarray]  # float weight -> integer weight (int8 storage)
    enabled: bool = True


def params_from_quantizer(key: str, q) -> ActParams | WeightParams:
    """Read one quantizer module (``ActQuantizer`` / ``WeightQuantizer`` of ``questdeploy.quant``)."""
    import torch

    enabled = bool(getattr(q, "enabled", True))
    if hasattr(q, "int_weight"):
        gran = getattr(q, "granularity", None)
        block = getattr(gran, "block_size", None)

        def int_fn(w: np.ndarray, q=q) -> np.ndarray:
            return q.int_weight(torch.from_numpy(np.ascontiguousarray(w))).cpu().numpy().astype(np.int8)

        return WeightParams(key, int(q.bits), q.scale.detach().float().cpu().numpy().astype(np.float32), block, int_fn, enabled)
    if hasattr(q, "scales"):
        shifts = getattr(q, "shifts", None)
        if shifts is not None:  # rows shaped to broadcast: (1, C, 1, 1) for a conv input, (C,) along the last axis
            if q.shift_axis not in (1, -1):
                raise LoweringError(f"{key}: channel shifts along axis {q.shift_axis} have no export form")
            G, C = shifts.shape
            row = (1, C, 1, 1) if q.shift_axis == 1 else (C,)
            shifts = shifts.detach().float().cpu().numpy().astype(np.float32).reshape(G, *row)
        return ActParams(key, int(q.bits), bool(getattr(q, "signed", True)),
                         q.scales.detach().float().cpu().numpy().astype(np.float32).reshape(-1), enabled, shifts)
    raise LoweringError(f"{key}: {type(q).__name__} is neither a weight nor an activation quantizer")


def params_from_model(quantizers: dict) -> dict[str, ActParams | WeightParams]:
    """``{key: params}`` from ``{key: quantizer module}`` (a ``MarkerRecord.quantizers`` or ``qunet.quantizers()``)."""
    return {k: params_from_quantizer(k, q) for k, q in quantizers.items()}


def static_scale(scales: np.ndarray, reduce: str = "max") -> np.float32:
    """The one scale the static form uses for a ``(G,)`` table."""
    if reduce not in STATIC_REDUCE:
        raise ValueError(f"static_reduce must be one of {STATIC_REDUCE}, got {reduce!r}")
    s = np.asarray(scales, dtype=np.float32)
    return np.float32(s.max() if reduce == "max" else s.mean(dtype=np.float64))


@contextlib.contextmanager
def collapsed_act_scales(qunet, reduce: str = "max") -> Iterator[None]:
    """Temporarily give every activation quantizer of ``qunet`` one scale (``static_scale``) in all groups,
    so the PyTorch model computes what the ``static_scales`` export computes."""
    import torch

    saved = []
    with torch.no_grad():
        for q in qunet.quantizers().values():
            if hasattr(q, "scales"):
                saved.append((q, q.scales.detach().clone()))
                q.scales.fill_(float(static_scale(q.scales.detach().float().cpu().numpy(), reduce)))
    try:
        yield
    finally:
        with torch.no_grad():
            for q, s in saved:
                q.scales.copy_(s)


# --------------------------------------------------------------------------------------------------
# dtype choices


def act_qtype(bits: int, signed: bool, form: str) -> tuple[int, int]:
    """(ONNX element type, zero point) for an activation quantizer in ``form``."""
    if bits == 8:
        if signed:
            return (TensorProto.UINT8, 128) if form == "ort" else (TensorProto.INT8, 0)
        return TensorProto.UINT8, 0
    if bits == 4:
        return (TensorProto.INT4 if signed else TensorProto.UINT4), 0
    if bits == 16:
        return (TensorProto.INT16 if signed else TensorProto.UINT16), 0
    raise LoweringError(f"no ONNX type for {bits}-bit activations")


def _np_dtype(elem_type: int):
    import ml_dtypes

    return {
        TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8, TensorProto.INT16: np.int16,
        TensorProto.UINT16: np.uint16, TensorProto.INT4: ml_dtypes.int4, TensorProto.UINT4: ml_dtypes.uint4,
    }[elem_type]


def _tensor(arr: np.ndarray, name: str, elem_type: int | None = None) -> TensorProto:
    if elem_type is not None:
        arr = np.asarray(arr).astype(_np_dtype(elem_type))
    return numpy_helper.from_array(np.asarray(arr), name)


# --------------------------------------------------------------------------------------------------
# report


@dataclass
class LowerReport:
    form: str
    static_scales: bool
    num_groups: int
    activation_quantizers: int = 0
    weight_quantizers: int = 0
    float_markers_removed: int = 0
    int4_widened: int = 0  # trt form: per-channel INT4 weights stored as INT8 (same values)
    unfused: list[str] = field(default_factory=list)  # trt form: rescale Mul right after DQ
    trt_violations: list[str] = field(default_factory=list)
    quant_tensors: dict[str, dict] = field(default_factory=dict)  # key -> {"tensor", "unit_scale"}
    integer: dict | None = None  # ort-int form: ort_integer.IntegerReport.to_dict()

    def to_dict(self) -> dict:
        out = {
            "form": self.form, "static_scales": self.static_scales, "num_groups": self.num_groups,
            "activation_quantizers": self.activation_quantizers, "weight_quantizers": self.weight_quantizers,
            "float_markers_removed": self.float_markers_removed, "int4_widened": self.int4_widened, "unfused": list(self.unfused),
            "trt_violations": list(self.trt_violations),
        }
        if self.integer is not None:
            out["integer"] = self.integer
        return out


# --------------------------------------------------------------------------------------------------
# the rewrite


class _Names:
    def __init__(self, graph: onnx.GraphProto):
        self.used = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
        for n in graph.node:
            self.used.update(n.output)
            self.used.update(n.input)
            if n.name:
                self.used.add(n.name)

    def new(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def lower(
    model: onnx.ModelProto,
    params: dict[str, ActParams | WeightParams],
    form: str,
    *,
    timestep_edges: Sequence[float] | None = None,
    static_scales: bool = False,
    static_reduce: str = "max",
    timestep_input: str = "timestep",
    metadata: dict[str, str] | None = None,
    keep_trace_metadata: bool = False,
) -> tuple[onnx.ModelProto, LowerReport]:
    """Return a new model in ``form`` (the input model is not modified) and a report.

    ``keep_trace_metadata``: keep torch.onnx's per-node ``pkg.torch.onnx.*`` metadata (stack traces, FX
    names: ~1.5 MB on an 18 M-parameter UNet); the module path (``namespace``) is always kept.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if static_reduce not in STATIC_REDUCE:
        raise ValueError(f"static_reduce must be one of {STATIC_REDUCE}, got {static_reduce!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = _Names(g)
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    graph_outputs = {o.name for o in g.output}

    G = 1
    if timestep_edges is not None:
        G = len(timestep_edges) - 1
    report = LowerReport(form=form, static_scales=static_scales, num_groups=G)

    head: list[onnx.NodeProto] = []  # nodes that go first (group lookup, scale gathers)
    new_inits: list[TensorProto] = []
    replace: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes emitted instead
    drop: set[int] = set()
    drop_inits: set[str] = set()
    pending: list[tuple] = []  # trt: (key, DQ output, runtime scale, emitted nodes, marker output)

    def const(arr, base, elem_type=None) -> str:
        name = names.new(base)
        new_inits.append(_tensor(arr, name, elem_type))
        return name

    group_tensor: list[str] = []
    one: list[str] = []

    def one_scale() -> str:
        if not one:
            one.append(const(np.array(1.0, np.float32), "qd_unit_scale"))
        return one[0]

    def group() -> str:
        if group_tensor:
            return group_tensor[0]
        if timestep_edges is None:
            raise LoweringError("per-timestep scales need timestep_edges")
        if timestep_input not in {i.name for i in g.input}:
            raise LoweringError(f"graph has no input {timestep_input!r} to compute the timestep group from")
        inner = np.asarray(list(timestep_edges)[1:-1], dtype=np.float32)
        flat, t0, t0f, ge, gef, gs, gi = (names.new(f"qd_group/{s}") for s in ("flat", "t0", "t0f", "ge", "gef", "sum", "index"))
        tin = next(i for i in g.input if i.name == timestep_input)
        head.extend([
            helper.make_node("Reshape", [timestep_input, const(np.array([-1], np.int64), "qd_group/minus1")], [flat],
                             name=names.new("qd_group/Reshape")),
            helper.make_node("Gather", [flat, const(np.array(0, np.int64), "qd_group/zero")], [t0], axis=0,
                             name=names.new("qd_group/Gather")),
        ])
        if tin.type.tensor_type.elem_type != TensorProto.FLOAT:
            head.append(helper.make_node("Cast", [t0], [t0f], to=TensorProto.FLOAT, name=names.new("qd_group/CastT")))
        else:
            t0f = t0
        head.extend([
            helper.make_node("GreaterOrEqual", [t0f, const(inner, "qd_group/interior_edges")], [ge],
                             name=names.new("qd_group/GreaterOrEqual")),
            helper.make_node("Cast", [ge], [gef], to=TensorProto.FLOAT, name=names.new("qd_group/CastF")),
            helper.make_node("ReduceSum", [gef], [gs], keepdims=0, name=names.new("qd_group/ReduceSum")),
            helper.make_node("Cast", [gs], [gi], to=TensorProto.INT32, name=names.new("qd_group/timestep_group")),
        ])
        group_tensor.append(gi)
        return gi

    def channel_shift(key: str, shifts: np.ndarray) -> str:
        """The current group's row of a shift table (a constant when there is one group)."""
        if shifts.shape[0] == 1:
            return const(shifts[0], f"{key}.shift")
        if shifts.shape[0] != G:
            raise LoweringError(f"{key}: {shifts.shape[0]} shift rows but {G} timestep groups")
        table = const(shifts, f"{key}.shift_table")
        o = names.new(f"{key}.shift")
        head.append(helper.make_node("Gather", [table, group()], [o], axis=0, name=names.new(f"{key}/GatherShift")))
        return o

    def runtime_scale(key: str, scales: np.ndarray) -> str:
        table = const(scales.astype(np.float32), f"{key}.scale_table")
        s = names.new(f"{key}.scale")
        head.append(helper.make_node("Gather", [table, group()], [s], axis=0, name=names.new(f"{key}/GatherScale")))
        return s

    for node in list(g.node):
        if node.op_type != MARKER_OP or node.domain != MARKER_DOMAIN:
            continue
        key = next((a.s.decode() for a in node.attribute if a.name == MARKER_ATTR), None)
        if key is None or key not in params:
            raise LoweringError(f"marker {node.name!r} names quantizer {key!r}, which the model does not have")
        p = params[key]
        x, y = node.input[0], node.output[0]
        if form == "fp" or not p.enabled:
            replace[id(node)] = [helper.make_node("Identity", [x], [y], name=names.new(f"{key}/Identity"))]
            report.float_markers_removed += 1
            continue
        if isinstance(p, WeightParams):
            report.weight_quantizers += 1
            replace[id(node)] = _lower_weight(node, key, p, x, y, inits, consumers, graph_outputs, names, new_inits, drop,
                                              drop_inits, widen_int4=(form == "trt" and not p.block_size))
            report.int4_widened += int(form == "trt" and p.bits == 4 and not p.block_size)
            continue
        # activation
        report.activation_quantizers += 1
        elem, zp_val = act_qtype(p.bits, p.signed, form)
        if form == "trt" and (elem != TensorProto.INT8):
            report.trt_violations.append(
                f"{key}: {p.bits}-bit {'signed' if p.signed else 'unsigned'} activation has no TensorRT Q/DQ type "
                f"(exported as {TensorProto.DataType.Name(elem)})"
            )
        runtime = (not static_scales) and p.scales.size > 1
        if runtime and timestep_edges is None:
            raise LoweringError(f"{key}: per-timestep scales need timestep_edges (or static_scales=True)")
        if runtime and p.scales.size != G:
            raise LoweringError(f"{key}: {p.scales.size} scales but {G} timestep groups")
        zp = const(np.array(zp_val), f"{key}.zero_point", elem)
        q = names.new(f"{key}.q")
        nodes: list[onnx.NodeProto] = []
        shifted = p.shifts is not None
        qin = x
        if shifted:  # x - shift[g] -> Q -> DQ -> + shift[g]: the Add keeps the DQ from feeding the layer directly
            if form == "trt":
                report.trt_violations.append(f"{key}: channel shifts have no TensorRT form (exported as Sub / Add)")
            o = channel_shift(key, p.shifts)
            qin = names.new(f"{key}.shifted")
            nodes.append(helper.make_node("Sub", [x, o], [qin], name=names.new(f"{key}/SubShift")))
        if form == "ort" or not runtime or shifted:
            s = runtime_scale(key, p.scales) if runtime else const(
                np.array(static_scale(p.scales, static_reduce) if p.scales.size > 1 else p.scales[0], np.float32), f"{key}.scale")
            nodes.append(helper.make_node("QuantizeLinear", [qin, s, zp], [q], name=names.new(f"{key}/QuantizeLinear")))
            dq_scale = s
        else:  # trt with a runtime scale: Div by s[g], unit-scale Q/DQ, s[g] re-applied after the layer
            s = runtime_scale(key, p.scales)
            xs = names.new(f"{key}.scaled")
            nodes += [helper.make_node("Div", [x, s], [xs], name=names.new(f"{key}/DivScale")),
                      helper.make_node("QuantizeLinear", [xs, one_scale(), zp], [q], name=names.new(f"{key}/QuantizeLinear"))]
            dq_scale = one_scale()
        replace[id(node)] = nodes
        info = {"x": qin, "q": q, "q_type": int(elem), "zero_point": int(zp_val), "bits": int(p.bits),
                "signed": bool(p.signed)}
        if shifted:  # the DQ feeds the Add back, never sunk; "out" is what PyTorch's quantizer returns
            dq = names.new(f"{key}.dq")
            nodes += [helper.make_node("DequantizeLinear", [q, dq_scale, zp], [dq], name=names.new(f"{key}/DequantizeLinear")),
                      helper.make_node("Add", [dq, o], [y], name=names.new(f"{key}/AddShift"))]
            report.quant_tensors[key] = {"tensor": dq, "unit_scale": False, **info, "sunk": False, "out": y}
            continue
        # sink the DQ below layout-only ops (Transpose / Reshape / ...) that lead to the consumer, so every
        # Conv / MatMul input comes straight from a DequantizeLinear (also what onnxruntime's QDQ fusion
        # wants; its own propagation of DQ through Transpose breaks on int8 at opset 21)
        cur, final, last = q, y, nodes
        if elem not in (TensorProto.INT4, TensorProto.UINT4):
            while True:
                uses = consumers.get(final, [])
                if len(uses) != 1 or final in graph_outputs:
                    break
                ln, idx = uses[0]
                if ln.op_type not in LAYOUT_OPS or ln.domain not in ("", "ai.onnx") or idx != 0 or id(ln) in replace:
                    break
                clone = onnx.NodeProto()
                clone.CopyFrom(ln)
                clone.input[0] = cur
                cur = names.new(f"{ln.output[0]}.q")
                clone.output[0] = cur
                last = [clone]
                replace[id(ln)] = last
                final = ln.output[0]
        dq = final if (form == "ort" or not runtime) else names.new(f"{key}.dq")
        last.append(helper.make_node("DequantizeLinear", [cur, dq_scale, zp], [dq], name=names.new(f"{key}/DequantizeLinear")))
        info["sunk"] = cur != q
        if form == "ort" or not runtime:
            report.quant_tensors[key] = {"tensor": dq, "unit_scale": False, **info}
        else:
            report.quant_tensors[key] = {"tensor": dq, "unit_scale": True, **info}
            pending.append((key, dq, s, last, final))

    # trt: decide where each runtime scale is re-applied
    rescale_after: dict[int, list[str]] = {}
    if pending:
        def follow(t: str, leaves: list) -> bool:
            uses = consumers.get(t, [])
            if not uses or t in graph_outputs:
                return False
            for n, idx in uses:
                if n.op_type in LAYOUT_OPS and idx == 0:
                    if not follow(n.output[0], leaves):
                        return False
                elif n.op_type in LINEAR_INPUTS and idx in LINEAR_INPUTS[n.op_type]:
                    leaves.append(n)
                else:
                    return False
            return True

        for key, dq, s, dq_nodes, y in pending:
            leaves: list[onnx.NodeProto] = []
            ok = follow(y, leaves) and len({id(n) for n in leaves}) == len(leaves)
            if ok:
                # the DQ itself produces the original tensor; the scale is re-applied after the layer
                dq_nodes[-1].output[0] = y
                for n in leaves:
                    rescale_after.setdefault(id(n), []).append(s)
                report.quant_tensors[key]["tensor"] = y
            else:
                dq_nodes.append(helper.make_node("Mul", [dq, s], [y], name=names.new(f"{y}/MulScale")))
                report.unfused.append(key)

    # assemble the node list
    new_nodes: list[onnx.NodeProto] = list(head)
    for node in g.node:
        if id(node) in drop:
            continue
        if id(node) in replace:
            new_nodes.extend(replace[id(node)])
            continue
        if id(node) in rescale_after:
            new_nodes.extend(_rescale(node, rescale_after[id(node)], inits, names, new_inits))
            continue
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)

    # initializers: drop replaced float weights that nothing reads any more
    still_used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if not (t.name in drop_inits and t.name not in still_used)]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    _remove_identities(g)
    _drop_unused_initializers(g)
    if not keep_trace_metadata:
        for n in g.node:
            keep_md = [p for p in n.metadata_props if not p.key.startswith("pkg.torch.onnx.")]
            if len(keep_md) != len(n.metadata_props):
                del n.metadata_props[:]
                n.metadata_props.extend(keep_md)
    # opsets: no private domain left
    keep_ops = [o for o in out.opset_import if o.domain != MARKER_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep_ops)
    for n in g.node:
        if n.domain == MARKER_DOMAIN:
            raise LoweringError(f"marker node {n.name} survived lowering")
    # value_info of tensors whose type changed (weight tensors now come from DQ: same float type) stays valid
    meta = {
        "form": form, "static_scales": json.dumps(bool(static_scales)), "static_reduce": static_reduce,
        "timestep_edges": json.dumps(list(map(float, timestep_edges)) if timestep_edges is not None else None),
        "quant_tensors": json.dumps(report.quant_tensors),
    }
    meta.update(metadata or {})
    _set_metadata(out, {META_PREFIX + k: v for k, v in meta.items()})
    if group_tensor:
        _set_metadata(out, {META_PREFIX + "group_tensor": group_tensor[0]})
    return out, report


def _lower_weight(node, key, p: WeightParams, x, y, inits, consumers, graph_outputs, names, new_inits, drop, drop_inits,
                  widen_int4: bool = False):
    """Integer weight initializer + DequantizeLinear. ``widen_int4``: store a per-channel 4-bit weight as INT8
    (the same values: the 4-bit grid is part of the 8-bit one), because TensorRT runs INT4 only as block-quantized
    MatMul/Gemm weights; a W4 conv then runs as an INT8 conv with bit-identical results."""
    if x not in inits:
        raise LoweringError(
            f"weight quantizer {key}: the weight {x!r} is not an initializer (produced by an op), cannot store it as integers"
        )
    w = numpy_helper.to_array(inits[x]).astype(np.float32)
    q = p.int_fn(w)
    if q.shape != w.shape:
        raise LoweringError(f"{key}: integer weight shape {q.shape} != weight shape {w.shape}")
    scale = p.scale.astype(np.float32)
    axis = 0
    block = p.block_size
    if block:
        axis = 1
    out_name = y
    uses = consumers.get(y, [])
    transposed = False
    if (len(uses) == 1 and y not in graph_outputs and uses[0][0].op_type == "Transpose" and w.ndim == 2):
        perm = next((list(a.ints) for a in uses[0][0].attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0]:
            transposed = True
            drop.add(id(uses[0][0]))
            out_name = uses[0][0].output[0]
            q = q.T
            scale = scale.T if scale.ndim == 2 else scale
            axis = 1 - axis if w.ndim == 2 else axis
    if p.bits not in (4, 8):
        raise LoweringError(f"{key}: {p.bits}-bit weights are not supported")
    stored_bits = 8 if widen_int4 else p.bits
    elem = TensorProto.INT8 if stored_bits == 8 else TensorProto.INT4
    qi = names.new(f"{key}.int{stored_bits}")
    new_inits.append(_tensor(np.ascontiguousarray(q), qi, elem))
    si = names.new(f"{key}.scale")
    new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale), si))
    # no zero-point input: ONNX defines the missing zero point as 0 of the weight's type (symmetric), which
    # TensorRT and onnxruntime's fusions accept; an explicit INT4 zero-point tensor per block costs ~1 % of the file
    attrs = {"axis": axis}
    if block:
        attrs["block_size"] = int(block)
    drop_inits.add(x)
    return [helper.make_node("DequantizeLinear", [qi, si], [out_name], name=names.new(f"{key}/DequantizeLinear"), **attrs)]


def _rescale(node: onnx.NodeProto, scales: list[str], inits, names: _Names, new_inits) -> list[onnx.NodeProto]:
    """``node`` (Conv / MatMul / Gemm) followed by ``Mul(prod(scales))`` and, if it had one, ``Add(bias)``."""
    out = []
    y = node.output[0]
    base = node.name or y
    s = scales[0]
    for extra in scales[1:]:
        s2 = names.new(f"{base}.scale_product")
        out.append(helper.make_node("Mul", [s, extra], [s2], name=names.new(f"{base}/ScaleProduct")))
        s = s2
    new = onnx.NodeProto()
    new.CopyFrom(node)
    raw = names.new(f"{y}.unscaled")
    new.output[0] = raw
    bias = None
    if node.op_type in ("Conv", "Gemm") and len(node.input) >= 3 and node.input[2]:
        bias = node.input[2]
        del new.input[2:]
        if node.op_type == "Gemm":
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
            if beta != 1.0:
                if bias not in inits:
                    raise LoweringError(f"{base}: Gemm with beta != 1 and a computed bias")
                bias = _scaled_bias(bias, inits, beta, names, new_inits)
        else:
            bias = _conv_bias(bias, node, inits, names, new_inits, out)
    out.append(new)
    if bias is None:
        out.append(helper.make_node("Mul", [raw, s], [y], name=names.new(f"{base}/MulScale")))
    else:
        mid = names.new(f"{y}.scaled")
        out.append(helper.make_node("Mul", [raw, s], [mid], name=names.new(f"{base}/MulScale")))
        out.append(helper.make_node("Add", [mid, bias], [y], name=names.new(f"{base}/AddBias")))
    return out


def _conv_bias(bias: str, node, inits, names, new_inits, out) -> str:
    # Conv bias (C,) broadcast over (N, C, *spatial): reshape to (1, C, 1, ..., 1)
    w = node.input[1]
    rank = None
    if w in inits:
        rank = len(inits[w].dims)
    if bias in inits and rank is not None:
        b = numpy_helper.to_array(inits[bias]).astype(np.float32)
        name = names.new(f"{bias}.bcast")
        new_inits.append(numpy_helper.from_array(b.reshape((1, -1) + (1,) * (rank - 2)), name))
        return name
    kshape = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
    spatial = len(kshape) if kshape else 2
    axes = names.new(f"{bias}.axes")
    new_inits.append(numpy_helper.from_array(np.array([0] + [2 + i for i in range(spatial)], np.int64), axes))
    name = names.new(f"{bias}.bcast")
    out.append(helper.make_node("Unsqueeze", [bias, axes], [name], name=names.new(f"{bias}/Unsqueeze")))
    return name


def _scaled_bias(bias, inits, beta, names, new_inits) -> str:
    b = numpy_helper.to_array(inits[bias]).astype(np.float32) * np.float32(beta)
    name = names.new(f"{bias}.beta")
    new_inits.append(numpy_helper.from_array(b, name))
    return name


def _remove_identities(g: onnx.GraphProto) -> None:
    """Remove the Identity nodes lowering inserted for float markers (rename their consumers)."""
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.domain == "" and n.output[0] not in outputs and n.name.endswith("/Identity"):
            src = rename.get(n.input[0], n.input[0])
            rename[n.output[0]] = src
            continue
        keep.append(n)
    if not rename:
        return
    for n in keep:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    vi = [v for v in g.value_info if v.name not in rename]
    del g.value_info[:]
    g.value_info.extend(vi)
    del g.node[:]
    g.node.extend(keep)


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {x for sn in a.g.node for x in sn.input}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def _set_metadata(model: onnx.ModelProto, kv: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in kv.items():
        v = "" if v is None else str(v)
        if k in existing:
            existing[k].value = v
        else:
            p = model.metadata_props.add()
            p.key, p.value = k, v


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """``questdeploy.*`` metadata of a lowered model, prefix stripped."""
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
