"""Small hand-built Q/DQ ONNX graphs for the TensorRT lint tests: one clean graph, and variants that
each break exactly one rule. Built with onnx.helper so every test states the graph it checks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F16 = TensorProto.FLOAT16


def _init(name, arr, dtype=None):
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, list(np.shape(arr)), np.asarray(arr).flatten().tolist())
    return numpy_helper.from_array(np.asarray(arr), name)


class G:
    """A tiny graph builder: ``g.qdq_act(x)``, ``g.conv(...)``, ``g.model()``."""

    def __init__(self, ftype=F16):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.ftype = ftype
        self.np_f = np.float16 if ftype == F16 else np.float32
        self.n = 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def input(self, name, shape, dtype=None):
        self.inputs.append(helper.make_tensor_value_info(name, dtype or self.ftype, shape))
        return name

    def output(self, name, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, self.ftype, shape))

    def const(self, arr, dtype=None, p="c"):
        n = self.name(p)
        self.inits.append(_init(n, arr, dtype))
        return n

    def node(self, op, inputs, p=None, domain="", **attrs):
        name = self.name(p or op.lower())
        out = name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs))
        return out

    def qdq_act(self, x, scale=0.05, zp=0, qtype=np.int8, scale_name=None, **attrs):
        s = scale_name or self.const(np.array(scale, dtype=self.np_f), p="s")
        if qtype in ("int4", "uint4"):
            z = self.const(np.zeros(np.shape(scale), dtype=np.int8), TensorProto.INT4 if qtype == "int4" else TensorProto.UINT4, p="zp")
        else:
            z = self.const(np.full(np.shape(scale), zp, dtype=qtype), p="zp")
        q = self.node("QuantizeLinear", [x, s, z], p="q", **attrs)
        return self.node("DequantizeLinear", [q, s, z], p="dq", **attrs)

    def dq_weight(self, w_int, scale, dtype=None, **attrs):
        w = self.const(w_int, dtype, p="w")
        s = self.const(np.asarray(scale, dtype=self.np_f), p="ws")
        return self.node("DequantizeLinear", [w, s], p="wdq", **attrs)

    def conv_w8(self, x, cin, cout, k=3):
        w = self.dq_weight(np.ones((cout, cin, k, k), np.int8), np.full((cout,), 0.01), axis=0)
        return self.node("Conv", [x, w], p="conv", pads=[1, 1, 1, 1])

    def matmul_w4(self, x, k_in, n_out, block=8):
        w = self.dq_weight(np.ones((k_in, n_out), np.int8), np.full((k_in // block, n_out), 0.01),
                           TensorProto.INT4, axis=0, block_size=block)
        return self.node("MatMul", [x, w], p="matmul")

    def model(self, opset=21, extra_opsets=()):
        graph = helper.make_graph(self.nodes, "t", self.inputs, self.outputs, self.inits)
        ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        m = helper.make_model(graph, opset_imports=ops)
        m.ir_version = 10
        return m


def clean(ftype=F16) -> onnx.ModelProto:
    """W8A8 convs with a quantized residual add, and a W4A8 MatMul: passes every rule."""
    g = G(ftype)
    x = g.input("sample", ["batch", 4, 8, 8])
    z = g.input("context", ["batch", 16])
    h = g.conv_w8(g.qdq_act(x), 4, 8)
    h2 = g.conv_w8(g.qdq_act(h), 8, 8)
    out = g.node("Add", [h2, g.qdq_act(h)], p="residual_add")
    g.output(out, ["batch", 8, 8, 8])
    m = g.matmul_w4(g.qdq_act(z), 16, 8)
    g.output(m, ["batch", 8])
    return g.model()


def unet_like(form: str = "trt", ftype=F16, batch_sym: str = "batch", timestep_sym: str = "timestep_len") -> onnx.ModelProto:
    """The export's I/O (sample, timestep, encoder_hidden_states -> out_sample) around one W8A8 conv.

    ``form="trt"``: constant Q/DQ scales; ``"ort"``: the Q/DQ scale is ``Gather(table, group(timestep))``;
    ``"fp"``: no Q/DQ. Every input is used, so TensorRT keeps all three as engine inputs.
    """
    g = G(ftype)
    x = g.input("sample", [batch_sym, 4, 8, 8])
    t = g.input("timestep", [timestep_sym])
    c = g.input("encoder_hidden_states", [batch_sym, "sequence", 16])
    if form == "fp":
        w = g.const(np.full((8, 4, 3, 3), 0.01, g.np_f))
        h = g.node("Conv", [x, w], p="conv", pads=[1, 1, 1, 1])
    elif form == "ort":
        idx0 = g.const(np.array(0, np.int64))
        t0 = g.node("Gather", [t, idx0], p="t0", axis=0)
        ge = g.node("GreaterOrEqual", [t0, g.const(np.array(500, g.np_f))], p="ge")
        grp = g.node("Cast", [ge], p="group", to=TensorProto.INT64)
        s = g.node("Gather", [g.const(np.array([0.05, 0.1], g.np_f), p="table"), grp], p="scale", axis=0)
        h = g.conv_w8(g.qdq_act(x, scale_name=s), 4, 8)
    else:
        h = g.conv_w8(g.qdq_act(x), 4, 8)
    ctx = g.node("ReduceMean", [c, g.const(np.array([1, 2], np.int64))], p="ctx", keepdims=1)  # [B,1,1]
    ctx4 = g.node("Unsqueeze", [ctx, g.const(np.array([3], np.int64))], p="ctx4")  # [B,1,1,1]
    tt = g.node("ReduceMean", [t], p="tmean", keepdims=0)
    ts = g.node("Mul", [tt, g.const(np.array(0.001, g.np_f))], p="tscale")
    out = g.node("Add", [g.node("Add", [h, ctx4], p="addctx"), ts], p="addt")
    g.nodes[-1].output[0] = "out_sample"
    g.output("out_sample", [batch_sym, 8, 8, 8])
    m = g.model()
    meta = m.metadata_props.add()
    meta.key, meta.value = "questdeploy.form", form
    if form != "fp":
        e = m.metadata_props.add()
        e.key, e.value = "questdeploy.timestep_edges", "[0.0, 500.0, 1000.0]"
    return m
