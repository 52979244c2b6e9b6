"""Lowering rules on small hand-built marked graphs (no tracing: milliseconds per test)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from questdeploy.export import markers
from questdeploy.export.qdq import ActParams, LoweringError, WeightParams, get_metadata, lower, static_scale
from questdeploy.quant.primitives import TimestepBins, fake_quant, qrange, quantize
from questdeploy.runners import OnnxRuntimeRunner, ReferenceRunner

EDGES = [0.0, 250.0, 500.0, 750.0, 1000.0]
rng = np.random.default_rng(0)
W_C = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
B_C = rng.standard_normal(8).astype(np.float32)
W_L = rng.standard_normal((6, 8)).astype(np.float32) * 0.3  # Linear (out, in)
B_L = rng.standard_normal(6).astype(np.float32)
W_G = rng.standard_normal((6, 6)).astype(np.float32) * 0.3  # Gemm (transB=1)


def _marker(x, key, y):
    return helper.make_node(markers.MARKER_OP, [x], [y], domain=markers.MARKER_DOMAIN, **{markers.MARKER_ATTR: key})


def marked_graph() -> onnx.ModelProto:
    """x -> [m] Conv(+bias) -> [m] Transpose -> MatMul(W_l^T [m]) -> Add(b) -> [m] Add(1) -> Reshape -> [m] Gemm."""
    markers._register()
    nodes = [
        _marker("x", "conv.input", "xm"),
        _marker("W_c", "conv.weight", "wcm"),
        helper.make_node("Conv", ["xm", "wcm", "B_c"], ["c"], pads=[1, 1, 1, 1]),
        _marker("c", "lin.input", "cm"),  # quantized before a layout op: the DQ is sunk below the Transpose
        helper.make_node("Transpose", ["cm"], ["lm"], perm=[0, 2, 3, 1]),
        _marker("W_l", "lin.weight", "wlm"),
        helper.make_node("Transpose", ["wlm"], ["wlt"], perm=[1, 0]),
        helper.make_node("MatMul", ["lm", "wlt"], ["mm"]),
        helper.make_node("Add", ["mm", "B_l"], ["lin"]),
        _marker("lin", "odd.input", "om"),  # feeds an Add: not factorable in the trt form
        helper.make_node("Add", ["om", "one"], ["odd"]),
        helper.make_node("Reshape", ["odd", "shape"], ["flat"]),
        _marker("flat", "gemm.input", "gm"),
        _marker("W_g", "gemm.weight", "wgm"),
        helper.make_node("Gemm", ["gm", "wgm", "B_l"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (W_C, "W_c"), (B_C, "B_c"), (W_L, "W_l"), (B_L, "B_l"), (W_G, "W_g"),
        (np.array(1.0, np.float32), "one"), (np.array([-1, 6], np.int64), "shape")]]
    g = helper.make_graph(nodes, "marked", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["T"]),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(markers.MARKER_DOMAIN, 1)])
    m.ir_version = 10
    return m


def _int_fn(bits, block=None):
    def fn(w, scale):
        kw = {"axis": 1, "block_size": block} if block else {"axis": 0}
        return quantize(torch.from_numpy(w), torch.from_numpy(scale), bits, True, out_dtype=torch.int8, **kw).numpy()
    return fn


def _wscale(w, bits, block=None):
    qmax = qrange(bits)[1]
    if block:
        return (np.abs(w.reshape(w.shape[0], -1, block)).max(-1) / qmax).astype(np.float32)
    return (np.abs(w.reshape(w.shape[0], -1)).max(1) / qmax).astype(np.float32)


def params(w_bits=8, a_bits=8, block=None):
    def wp(key, w, blk=None):
        s = _wscale(w, w_bits, blk)
        return WeightParams(key, w_bits, s, blk, lambda arr, s=s, blk=blk: _int_fn(w_bits, blk)(arr, s))

    def ap(key, base):
        return ActParams(key, a_bits, True, (base * np.array([1.0, 1.5, 2.0, 3.0])).astype(np.float32))

    return {
        "conv.input": ap("conv.input", 0.02), "conv.weight": wp("conv.weight", W_C),
        "lin.input": ap("lin.input", 0.05), "lin.weight": wp("lin.weight", W_L, block),
        "odd.input": ap("odd.input", 0.05), "gemm.input": ap("gemm.input", 0.06),
        "gemm.weight": wp("gemm.weight", W_G),
    }


def torch_reference(x: np.ndarray, t: float, p: dict, static=False) -> np.ndarray:
    """The marked graph with fake quantization in PyTorch (questdeploy.quant.primitives)."""
    g = TimestepBins(tuple(EDGES)).group(t)

    def act(v, key):
        s = static_scale(p[key].scales) if static else p[key].scales[g]
        return fake_quant(v, torch.tensor(float(s)), p[key].bits, p[key].signed)

    def wt(w, key):
        wp_ = p[key]
        kw = {"axis": 1, "block_size": wp_.block_size} if wp_.block_size else {"axis": 0}
        return fake_quant(torch.from_numpy(w), torch.from_numpy(wp_.scale), wp_.bits, True, **kw)

    xt = act(torch.from_numpy(x), "conv.input")
    c = torch.nn.functional.conv2d(xt, wt(W_C, "conv.weight"), torch.from_numpy(B_C), padding=1)
    lm = act(c, "lin.input").permute(0, 2, 3, 1)
    lin = lm @ wt(W_L, "lin.weight").T + torch.from_numpy(B_L)
    odd = act(lin, "odd.input") + 1.0
    gm = act(odd.reshape(-1, 6), "gemm.input")
    return (gm @ wt(W_G, "gemm.weight").T + torch.from_numpy(B_L)).numpy()


def _run(model, x, t, runner="ort"):
    feed = {"x": x, "timestep": np.array([t], np.float32)}
    r = OnnxRuntimeRunner(model.SerializeToString()) if runner == "ort" else ReferenceRunner(model)
    return r.infer(feed)["y"]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("form", ["ort", "trt"])
@pytest.mark.parametrize("bits", [(8, 8, None), (4, 8, 4), (4, 4, None)], ids=["w8a8", "w4a8-block4", "w4a4"])
def test_lowered_graph_matches_fake_quant(form, static, bits):
    p = params(*bits)
    m, rep = lower(marked_graph(), p, form, timestep_edges=EDGES, static_scales=static)
    onnx.checker.check_model(m, full_check=True)
    assert {n.domain for n in m.graph.node} == {""} and markers.MARKER_DOMAIN not in {o.domain for o in m.opset_import}
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    for t in (0.0, 249.0, 250.0, 600.0, 999.0):
        want = torch_reference(x, t, p, static)
        for runner in ("ort", "ref"):
            got = _run(m, x, t, runner)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trt_form_moves_scales_out_of_qdq_and_reports_unfused():
    m, rep = lower(marked_graph(), params(), "trt", timestep_edges=EDGES)
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert n.input[1] in inits
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 2  # bias moved behind the rescale
    consumers = [n.op_type for n in m.graph.node if conv.output[0] in n.input]
    assert consumers == ["Mul"]
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    assert len(gemm.input) == 2
    assert rep.unfused == ["odd.input"]  # its DQ feeds an Add: Mul(s) right after the DQ
    assert sum(1 for n in m.graph.node if n.op_type == "Div") == 4
    assert "qd_group/timestep_group" in {n.name for n in m.graph.node}
    assert nodes  # names are unique and present


def test_ort_form_structure():
    m, rep = lower(marked_graph(), params(), "ort", timestep_edges=EDGES)
    inits = {t.name: t for t in m.graph.initializer}
    assert rep.activation_quantizers == 4 and rep.weight_quantizers == 3
    # Linear weight stored transposed (K, N) feeding MatMul directly, per-channel axis 1; no float weights left
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    dq = next(n for n in m.graph.node if n.output[0] == mm.input[1])
    assert dq.op_type == "DequantizeLinear" and list(inits[dq.input[0]].dims) == [8, 6]
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert not {"W_c", "W_l", "W_g"} & set(inits)
    # the activation DQ was sunk below the Transpose: MatMul's input 0 comes from a DQ too
    dq0 = next(n for n in m.graph.node if n.output[0] == mm.input[0])
    assert dq0.op_type == "DequantizeLinear"
    tr = next(n for n in m.graph.node if n.op_type == "Transpose")
    assert any(n.op_type == "QuantizeLinear" and n.output[0] == tr.input[0] for n in m.graph.node)
    meta = get_metadata(m)
    assert meta["form"] == "ort" and json.loads(meta["timestep_edges"]) == EDGES
    assert json.loads(meta["quant_tensors"])["lin.input"]["sunk"] is True


def test_blocked_int4_weight_layout():
    m, rep = lower(marked_graph(), params(4, 8, 4), "ort", timestep_edges=EDGES)
    inits = {t.name: t for t in m.graph.initializer}
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    dq = next(n for n in m.graph.node if n.output[0] == mm.input[1])
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 4}
    assert inits[dq.input[0]].data_type == TensorProto.INT4 and list(inits[dq.input[1]].dims) == [2, 6]
    assert len(dq.input) == 2  # symmetric: no zero-point tensor


def test_fp_form_removes_markers_only():
    m, rep = lower(marked_graph(), params(), "fp", timestep_edges=EDGES)
    assert rep.float_markers_removed == 7
    assert not [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity")]
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    c = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(W_C), torch.from_numpy(B_C), padding=1)
    lin = c.permute(0, 2, 3, 1) @ torch.from_numpy(W_L).T + torch.from_numpy(B_L) + 1.0
    want = (lin.reshape(-1, 6) @ torch.from_numpy(W_G).T + torch.from_numpy(B_L)).numpy()
    np.testing.assert_allclose(_run(m, x, 10.0), want, rtol=1e-5, atol=1e-5)


def test_disabled_quantizer_stays_float():
    p = params()
    p["odd.input"].enabled = False
    m, rep = lower(marked_graph(), p, "ort", timestep_edges=EDGES)
    assert rep.activation_quantizers == 3 and rep.float_markers_removed == 1
    assert "odd.input" not in json.loads(get_metadata(m)["quant_tensors"])


def test_errors():
    with pytest.raises(LoweringError, match="does not have"):
        p = params()
        del p["lin.input"]
        lower(marked_graph(), p, "ort", timestep_edges=EDGES)
    with pytest.raises(LoweringError, match="timestep_edges"):
        lower(marked_graph(), params(), "ort", timestep_edges=None)
    with pytest.raises(ValueError, match="form"):
        lower(marked_graph(), params(), "tensorrt", timestep_edges=EDGES)


def test_static_form_needs_no_timestep_lookup():
    m, rep = lower(marked_graph(), params(), "trt", timestep_edges=EDGES, static_scales=True)
    assert not [n for n in m.graph.node if n.op_type in ("Gather", "Div", "ReduceSum")]
    assert rep.num_groups == 4 and not rep.unfused


def test_activation_types_per_form():
    from questdeploy.export.qdq import act_qtype

    assert act_qtype(8, True, "ort") == (TensorProto.UINT8, 128)
    assert act_qtype(8, True, "trt") == (TensorProto.INT8, 0)
    assert act_qtype(8, False, "ort") == (TensorProto.UINT8, 0)
    assert act_qtype(4, True, "ort") == (TensorProto.INT4, 0)
    assert act_qtype(16, False, "trt") == (TensorProto.UINT16, 0)
