"""The ``ort-int`` form: the ``ort`` form with its quantized Convs and weight MatMuls as explicit integer GEMMs.

Why this form exists
--------------------
The ``ort`` form quantizes the *inputs* of Conv / MatMul (what TensorRT wants, and what QuEST's fake-quant
model computes). onnxruntime 1.32's CPU provider runs a Conv in int8 only as ``QLinearConv``, which needs a
quantized Conv *output* with a constant scale; without one it keeps the Conv in float, and the
``DequantizeLinear`` on the weight even costs it the NCHWc float path. Measured on the SD-shaped UNet at
batch 8: the ``ort`` form ran at 0.98-1.06x FP32, this form at 1.4-1.7x (README, "ONNX size and onnxruntime
CPU latency"). Quantizing the outputs would add a rounding the
PyTorch model does not have and cannot carry per-timestep scales into a fused kernel.

What the rewrite does (one post-pass over a lowered ``ort`` model, ``integerize``)
-------------------------------------------------------------------------------
Every ``Conv(DQ(x_q: uint8), DQ(W: int8 per output channel), bias)`` becomes an im2col + integer GEMM on the
*same* quantized values::

    x_q -> Transpose(NHWC) -> Pad(value = x's zero point) -> Reshape [N, Hp*Wp, C]
        -> Gather(axis 1, constant im2col index) -> Reshape [N, Ho, Wo, kh*kw*C]
        -> MatMulInteger(col, W [(ky, kx, c), Co] int8, x_zp, 0) -> Cast(float)
        -> Mul(Mul(s_x, w_scale)) -> Add(bias) -> Transpose(NCHW)

(1x1 stride-1 unpadded convs skip Pad / Gather.) Every weight ``MatMul(DQ(x_q), DQ(W))`` (+ a constant 1-D
bias ``Add``) becomes ``MatMulInteger -> Cast -> Mul(Mul(s_x, w_scale)) -> Add(bias)``. The products and
their int32 sums are exact, so each layer equals the float layer on the dequantized values up to the
float32 rounding of the rescale (relative error ~1e-7); the activation ``QuantizeLinear`` nodes stay as they
were (same names), so the teacher-forced quantizer checks of ``verify`` read them unchanged.

``ops="standard"`` writes only standard ONNX ops (opset 21): onnxruntime's
``MatMulIntegerToFloatFusion`` (optimization level extended and up) turns ``MatMulInteger -> Cast -> Mul
(with the scale product as a ``Mul(s_x, w_scale)`` node) -> Add(const bias)`` into one
``com.microsoft.MatMulIntegerToFloat`` u8s8 kernel, so the file stays portable and ``onnx.reference`` runs
it. ``ops="com.microsoft"`` writes that contrib op directly (onnxruntime-only; recorded in the metadata).
The fusion needs the scale product to be computed in the graph: with static scales both factors are
constants, onnxruntime folds the ``Mul`` first and the fusion no longer matches (measured: 120 of 148
GEMMs left unfused, ~10 % slower). ``ops="auto"`` (default) therefore writes standard ops for per-timestep
scales and the contrib op for static ones.

The im2col index depends on the spatial size, so it is baked for the exported sample size: a model whose
height / width are dynamic is refused (``DynamicSpatialShapeError``). The batch dimension stays symbolic
(every ``Reshape`` copies it with ``0``; static 3-D shapes let onnxruntime rewrite MatMuls into Gemm /
MatMulNBits paths that lose the integer kernel). Indices are int32 (half the bytes of int64) and shared
between convs of the same geometry.

Layers that do not fit (grouped or dilated convs, int4 / int16 activations, block-quantized INT4 weights,
activation x activation MatMuls of attention, float layers) are left as in the ``ort`` form and listed in the
report; a model where nothing fits (weight-only quantization) is refused, since the result would be the
``ort`` form under another name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from questdeploy.errors import QuestDeployError

from .qdq import META_PREFIX, _Names, _set_metadata, get_metadata

FORM = "ort-int"
BASE_FORM = "ort"
OPS = ("auto", "standard", "com.microsoft")
MS_DOMAIN = "com.microsoft"
INPUT_SAMPLE = "sample"


class OrtIntegerError(QuestDeployError):
    """The model cannot be rewritten into the ``ort-int`` form."""


class DynamicSpatialShapeError(OrtIntegerError):
    """A conv's input height / width is not fixed: the im2col index cannot be baked."""


@dataclass
class IntegerReport:
    ops: str
    convs: int = 0
    linears: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # node -> why it stays as in the ort form
    index_bytes: int = 0

    def to_dict(self) -> dict:
        return {"ops": self.ops, "convs": self.convs, "linears": self.linears, "kept": dict(self.kept),
                "index_bytes": self.index_bytes}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_dims(vi: onnx.ValueInfoProto | None) -> list[int | None] | None:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def im2col_index(h: int, w: int, kh: int, kw: int, stride: tuple[int, int], pads: tuple[int, int, int, int],
                 dtype=np.int32) -> np.ndarray:
    """Flat indices into a padded ``[Hp * Wp]`` NHWC plane, ordered ``(oy, ox, ky, kx)``: gathering them along the
    spatial axis and reshaping to ``[Ho, Wo, kh * kw * C]`` gives the im2col rows of a stride/pad conv."""
    wp = w + pads[1] + pads[3]
    ho = (h + pads[0] + pads[2] - kh) // stride[0] + 1
    wo = (w + pads[1] + pads[3] - kw) // stride[1] + 1
    yy, xx = np.meshgrid(np.arange(ho) * stride[0], np.arange(wo) * stride[1], indexing="ij")
    idx = np.stack([(yy + dy) * wp + (xx + dx) for dy in range(kh) for dx in range(kw)], -1)
    return idx.reshape(-1).astype(dtype)


def integerize(model: onnx.ModelProto, ops: str = "auto", index_dtype=np.int32) -> tuple[onnx.ModelProto, IntegerReport]:
    """Return the ``ort-int`` form of a lowered ``ort`` model (a new model; the input is not modified).

    ``ops``: ``"standard"`` (MatMulInteger / Cast / Mul / Add, fused by onnxruntime), ``"com.microsoft"``
    (MatMulIntegerToFloat written out) or ``"auto"``: standard when every activation scale is computed at run
    time (per-timestep tables), the contrib op for static scales (see the module docstring).
    """
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    meta = get_metadata(model)
    if meta.get("form") != BASE_FORM:
        raise OrtIntegerError(
            f"the ort-int rewrite takes a model in the '{BASE_FORM}' form, got form {meta.get('form')!r}",
            hint="lower with target 'ort' first (questdeploy export --target ort-int does both steps)")
    static = json.loads(meta.get("static_scales", "false") or "false") or not meta.get("group_tensor")
    if ops == "auto":
        ops = MS_DOMAIN if static else "standard"
    _check_spatial(model)
    out = onnx.shape_inference.infer_shapes(model)
    g = out.graph
    shapes = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    graph_outputs = {o.name for o in g.output}
    qt = json.loads(meta.get("quant_tensors", "{}") or "{}")
    key_of_dq = {v["tensor"]: k for k, v in qt.items() if v.get("tensor")}
    names = _Names(g)
    report = IntegerReport(ops=ops)
    new_inits: list[TensorProto] = []
    shared: dict[tuple, str] = {}
    replace: dict[int, list[onnx.NodeProto]] = {}
    dead: set[int] = set()
    layers: list[dict] = []

    def const(arr: np.ndarray, base: str, share_key: tuple | None = None) -> str:
        if share_key is not None and share_key in shared:
            return shared[share_key]
        name = names.new(base)
        new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        if share_key is not None:
            shared[share_key] = name
        return name

    def node(op, inputs, outputs, base, **kw):
        return helper.make_node(op, inputs, outputs, name=names.new(base), **kw)

    def quantized_operands(n: onnx.NodeProto, why: dict) -> tuple | None:
        """(DQ of x, DQ of W, x_q, x scale, x zero point, int8 W, W scale) or None (reason in ``why``)."""
        dqx, dqw = producer.get(n.input[0]), producer.get(n.input[1])
        if not (dqx is not None and dqw is not None and dqx.op_type == "DequantizeLinear" and dqw.op_type == "DequantizeLinear"):
            why["r"] = "an input is not dequantized (a float or weight-only layer)"
            return None
        if dqw.input[0] not in inits:
            why["r"] = "second operand is not a constant weight (activation x activation, e.g. attention)"
            return None
        if len(dqw.input) > 2 and dqw.input[2]:
            why["r"] = "weight has a zero-point input (questdeploy weights are symmetric)"
            return None
        if any(a.name == "block_size" and a.i for a in dqw.attribute):
            why["r"] = "block-quantized INT4 weight (onnxruntime runs it as MatMulNBits)"
            return None
        if len(dqx.input) < 3 or dqx.input[2] not in inits:
            why["r"] = "activation has no constant zero point"
            return None
        zp = numpy_helper.to_array(inits[dqx.input[2]])
        if zp.dtype != np.uint8 or zp.size != 1:
            why["r"] = f"activation stored as {zp.dtype} (only uint8 feeds onnxruntime's u8s8 kernels)"
            return None
        wq = numpy_helper.to_array(inits[dqw.input[0]])
        if wq.dtype != np.int8 and str(wq.dtype) != "int4":  # per-channel INT4 widens to int8 (the same values)
            why["r"] = f"weight stored as {wq.dtype}"
            return None
        ws = numpy_helper.to_array(inits[dqw.input[1]]).astype(np.float32)
        axis = next((a.i for a in dqw.attribute if a.name == "axis"), 1)
        want_axis = 0 if n.op_type == "Conv" else 1  # output channel: Conv W [Co, Ci, kh, kw], MatMul W [in, out]
        if ws.size > 1 and (ws.ndim != 1 or axis % wq.ndim != want_axis):
            why["r"] = f"weight scale of shape {list(ws.shape)} on axis {axis} is not per output channel"
            return None
        return dqx, dqw, dqx.input[0], dqx.input[1], dqx.input[2], wq.astype(np.int8), ws

    def gemm_tail(col, wmat, s, zp, ws, bias, y, base) -> list[onnx.NodeProto]:
        """Integer GEMM ``col @ wmat`` rescaled by ``s * ws`` plus ``bias``, written to ``y``."""
        wname = const(wmat, f"{base}.weight_int8")
        wzp = const(np.array(0, np.int8), "ortint_weight_zero_point", ("wzp",))
        wsn = const(ws, f"{base}.weight_scale")
        if ops == MS_DOMAIN:
            ins = [col, wname, s, wsn, zp, wzp] + ([bias] if bias else [])
            return [node("MatMulIntegerToFloat", ins, [y], f"{base}/MatMulIntegerToFloat", domain=MS_DOMAIN)]
        acc, accf, sw, scaled = (names.new(f"{base}.{t}") for t in ("acc", "acc_float", "scale", "scaled"))
        nodes = [
            node("MatMulInteger", [col, wname, zp, wzp], [acc], f"{base}/MatMulInteger"),
            node("Cast", [acc], [accf], f"{base}/Cast", to=TensorProto.FLOAT),
            node("Mul", [s, wsn], [sw], f"{base}/ScaleProduct"),  # (s_x, w_scale): the order the fusion reads
        ]
        if bias:
            nodes += [node("Mul", [accf, sw], [scaled], f"{base}/Rescale"), node("Add", [scaled, bias], [y], f"{base}/AddBias")]
        else:
            nodes.append(node("Mul", [accf, sw], [y], f"{base}/Rescale"))
        return nodes

    def retire(dq: onnx.NodeProto) -> None:
        if len(consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in graph_outputs:
            dead.add(id(dq))
            key = key_of_dq.get(dq.output[0])
            if key is not None:  # the dequantized tensor is gone: the GEMM reads the integers directly
                qt[key]["tensor"] = None
                qt[key]["integer_gemm"] = True

    for n in g.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in ("Conv", "MatMul"):
            continue
        why: dict = {}
        ops_ = quantized_operands(n, why)
        label = n.name or n.output[0]
        if ops_ is None:
            report.kept[label] = why["r"]
            continue
        dqx, dqw, xq, s, zp, wq, ws = ops_
        base = f"{label}.int"
        key = key_of_dq.get(dqx.output[0])
        if n.op_type == "Conv":
            a = _attrs(n)
            if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])) or wq.ndim != 4:
                report.kept[label] = "grouped, dilated or non-2-D conv"
                continue
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                report.kept[label] = "auto_pad conv"
                continue
            dims = _static_dims(shapes.get(n.input[0])) or _static_dims(shapes.get(xq))
            if not dims or len(dims) != 4 or dims[2] is None or dims[3] is None:
                raise DynamicSpatialShapeError(
                    f"conv {label!r}: input height / width unknown ({dims}); the ort-int form bakes an im2col index "
                    "for one spatial size",
                    hint="export with a fixed sample size (height and width static), or use --target ort")
            co, ci, kh, kw = wq.shape
            h, w = dims[2], dims[3]
            st = tuple(a.get("strides", [1, 1]))
            pads = tuple(a.get("pads", [0, 0, 0, 0]))
            bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if bias and (bias not in inits or len(inits[bias].dims) != 1):
                report.kept[label] = "conv bias is not a constant 1-D tensor"
                continue
            ho = (h + pads[0] + pads[2] - kh) // st[0] + 1
            wo = (w + pads[1] + pads[3] - kw) // st[1] + 1
            nhwc = names.new(f"{base}.x_nhwc")
            nodes = [node("Transpose", [xq], [nhwc], f"{base}/ToNHWC", perm=[0, 2, 3, 1])]
            if (kh, kw, st, pads) == (1, 1, (1, 1), (0, 0, 0, 0)):
                col = nhwc
            else:
                hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
                cur = nhwc
                if any(pads):
                    cur = names.new(f"{base}.x_pad")
                    pv = const(np.array([0, pads[0], pads[1], 0, 0, pads[2], pads[3], 0], np.int64), "ortint_pads", ("pads", pads))
                    nodes.append(node("Pad", [nhwc, pv, zp], [cur], f"{base}/Pad"))
                flat, gathered, col = (names.new(f"{base}.{t}") for t in ("x_flat", "col_flat", "col"))
                idx = im2col_index(h, w, kh, kw, st, pads, index_dtype)
                ikey = ("im2col", h, w, kh, kw, st, pads, np.dtype(index_dtype).str)
                if ikey not in shared:
                    report.index_bytes += idx.nbytes
                nodes += [
                    node("Reshape", [cur, const(np.array([0, hp * wp, ci], np.int64), "ortint_shape", ("shape", hp * wp, ci))],
                         [flat], f"{base}/Flatten"),
                    node("Gather", [flat, const(idx, f"ortint_im2col_{h}x{w}_k{kh}x{kw}_s{st[0]}", ikey)], [gathered],
                         f"{base}/Im2col", axis=1),
                    node("Reshape", [gathered, const(np.array([0, ho, wo, kh * kw * ci], np.int64), "ortint_shape",
                                                     ("shape", ho, wo, kh * kw * ci))], [col], f"{base}/Rows"),
                ]
            wmat = np.ascontiguousarray(wq.transpose(2, 3, 1, 0).reshape(kh * kw * ci, co))
            y_nhwc = names.new(f"{base}.y_nhwc")
            nodes += gemm_tail(col, wmat, s, zp, np.broadcast_to(ws.reshape(-1), (co,)).copy(), bias, y_nhwc, base)
            nodes.append(node("Transpose", [y_nhwc], [n.output[0]], f"{base}/ToNCHW", perm=[0, 3, 1, 2]))
            replace[id(n)] = nodes
            report.convs += 1
            layers.append({"kind": "conv", "node": label, "quantizer": key, "input": xq, "output": n.output[0],
                           "kernel": [kh, kw], "strides": list(st), "pads": list(pads)})
        else:  # MatMul with a constant integer weight [in, out] (per output channel: scale along axis 1)
            if wq.ndim != 2:
                report.kept[label] = "weight is not a 2-D matrix"
                continue
            y, bias = n.output[0], None
            nxt = consumers.get(y, [])
            if len(nxt) == 1 and nxt[0].op_type == "Add" and y not in graph_outputs:
                other = [x for x in nxt[0].input if x != y]
                if len(other) == 1 and other[0] in inits and list(inits[other[0]].dims) == [wq.shape[1]]:
                    bias, y = other[0], nxt[0].output[0]
                    dead.add(id(nxt[0]))
            replace[id(n)] = gemm_tail(xq, wq, s, zp, np.broadcast_to(ws.reshape(-1), (wq.shape[1],)).copy(), bias, y, base)
            report.linears += 1
            layers.append({"kind": "linear", "node": label, "quantizer": key, "input": xq, "output": y})
        retire(dqx)
        retire(dqw)

    if not layers:
        raise OrtIntegerError(
            "no Conv / MatMul has an 8-bit (uint8) quantized input and an int8 weight: the ort-int form would be the "
            f"ort form unchanged ({len(report.kept)} layer(s) kept, e.g. {next(iter(report.kept.values()), 'none')})",
            hint="use --target ort (weight-only or 4-bit-activation models gain nothing from integer GEMMs)")
    new_nodes = []
    for n in g.node:
        if id(n) in dead:
            continue
        new_nodes.extend(replace.get(id(n), [n]))
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    used = {x for n in g.node for x in n.input} | graph_outputs
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    # inferred shapes were only needed to size the index; keep the file as the exporter wrote it
    del g.value_info[:]
    g.value_info.extend(vi for vi in model.graph.value_info if vi.name in used)
    if ops == MS_DOMAIN and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _set_metadata(out, {META_PREFIX + k: v for k, v in {
        "form": FORM,
        "base_form": BASE_FORM,
        "integer_ops": ops,
        "runtime": "onnxruntime" if ops == MS_DOMAIN else "any (standard ops; onnxruntime fuses them into MatMulIntegerToFloat)",
        "spatial_size": json.dumps(_sample_hw(model)),
        "quant_tensors": json.dumps(qt),
        "integer_layers": json.dumps(layers),
    }.items()})
    return out, report


def _sample_hw(model: onnx.ModelProto) -> list | None:
    vi = next((i for i in model.graph.input if i.name == INPUT_SAMPLE), None)
    dims = _static_dims(vi)
    return dims[2:] if dims and len(dims) == 4 else None


def _check_spatial(model: onnx.ModelProto) -> None:
    """Refuse early (before shape inference) a ``sample`` input whose height / width are symbolic."""
    vi = next((i for i in model.graph.input if i.name == INPUT_SAMPLE), None)
    dims = _static_dims(vi)
    if dims is not None and len(dims) == 4 and (dims[2] is None or dims[3] is None):
        shown = [d.dim_param or "?" if not d.HasField("dim_value") else d.dim_value for d in vi.type.tensor_type.shape.dim]
        raise DynamicSpatialShapeError(
            f"input {INPUT_SAMPLE!r} has dynamic height / width {shown[2:]}; the ort-int form bakes each conv's im2col "
            "index for one spatial size",
            hint="export with fixed height and width (questdeploy's exporter fixes them to the model's sample_size), "
                 "or use --target ort, which accepts any size")


def expand_contrib_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every ``com.microsoft.MatMulIntegerToFloat`` written as the standard ops it fuses
    (``MatMulInteger -> Cast -> Mul(Mul(a_scale, b_scale)) -> Add(bias)``: its documented semantics), so that
    ``onnx.reference``, which implements no contrib op, can evaluate an ``ops="com.microsoft"`` export."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = _Names(g)
    nodes = []
    for n in g.node:
        if not (n.domain == MS_DOMAIN and n.op_type == "MatMulIntegerToFloat"):
            nodes.append(n)
            continue
        ins = list(n.input) + [""] * (7 - len(n.input))
        a, b, sa, sb, za, zb, bias = ins
        base = n.name or n.output[0]
        acc, accf, sw, scaled = (names.new(f"{base}.{t}") for t in ("acc", "acc_float", "scale", "scaled"))
        mmi_in = [a, b, za, zb]
        while not mmi_in[-1]:
            mmi_in.pop()
        nodes += [helper.make_node("MatMulInteger", mmi_in, [acc], name=names.new(f"{base}/MatMulInteger")),
                  helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT, name=names.new(f"{base}/Cast")),
                  helper.make_node("Mul", [sa, sb], [sw], name=names.new(f"{base}/ScaleProduct"))]
        if bias:
            nodes += [helper.make_node("Mul", [accf, sw], [scaled], name=names.new(f"{base}/Rescale")),
                      helper.make_node("Add", [scaled, bias], [n.output[0]], name=names.new(f"{base}/AddBias"))]
        else:
            nodes.append(helper.make_node("Mul", [accf, sw], [n.output[0]], name=names.new(f"{base}/Rescale")))
    del g.node[:]
    g.node.extend(nodes)
    if not any(n.domain == MS_DOMAIN for n in g.node):
        keep = [o for o in out.opset_import if o.domain != MS_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out
