"""ONNX's own QuantizeLinear / DequantizeLinear node test cases, replayed through our primitives.

The exporter emits Q/DQ nodes from scales learned with ``questdeploy.quant.primitives``; if our
``quantize`` / ``dequantize`` reproduce ONNX's expected outputs bit for bit (rounding half to even,
saturation, zero points, per-axis, blocked, int4), the fake-quantized PyTorch model and the exported
graph compute the same numbers. The cases are generated from ``onnx.backend.test.case.node`` (the wheel
ships no node data folder) with a local recorder in place of ``expect``, so nothing global is touched.
Types questdeploy does not quantize to (float8, float4, int2, 16-bit) are skipped with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from questdeploy.quant.primitives import dequantize, quantize

# the quantized integer types we support: numpy dtype name -> (bits, signed)
SUPPORTED = {"int8": (8, True), "uint8": (8, False), "int4": (4, True), "uint4": (4, False)}


def _collect():
    import onnx.backend.test.case.node as node_pkg

    recorded = []

    def record(node, inputs, outputs, name, **kwargs):
        recorded.append((name, node, list(inputs), list(outputs)))

    # importing the case modules runs their exports once through the real ``expect``; make that a no-op
    saved = node_pkg._TargetOpType
    node_pkg._TargetOpType = "__questdeploy_none__"
    try:
        from onnx.backend.test.case.node import dequantizelinear, quantizelinear
    finally:
        node_pkg._TargetOpType = saved
    for mod, cls in ((quantizelinear, quantizelinear.QuantizeLinear), (dequantizelinear, dequantizelinear.DequantizeLinear)):
        original = mod.expect
        mod.expect = record
        try:
            for attr in sorted(vars(cls)):
                if attr.startswith("export"):
                    np.random.seed(0)
                    getattr(cls, attr)()
        finally:
            mod.expect = original
    return recorded


def _arr(a) -> np.ndarray:
    return numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else np.asarray(a)


CASES = _collect()


def test_cases_were_collected():
    names = {c[0] for c in CASES}
    # the cases that matter for questdeploy must exist, or this conformance suite silently tests nothing
    for required in (
        "test_quantizelinear", "test_quantizelinear_axis", "test_quantizelinear_int4", "test_quantizelinear_uint4",
        "test_quantizelinear_blocked_asymmetric", "test_dequantizelinear", "test_dequantizelinear_blocked",
        "test_dequantizelinear_int4",
    ):
        assert required in names


def _kwargs(node, scale: np.ndarray) -> dict:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    block = attrs.get("block_size", 0)
    if block:
        return {"axis": attrs.get("axis", 1), "block_size": block}
    if scale.ndim == 0 or scale.size == 1:
        return {}
    return {"axis": attrs.get("axis", 1)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_onnx_node_case(case):
    name, node, inputs, outputs = case
    arrays = [_arr(a) for a in inputs]
    expected = _arr(outputs[0])
    qtype = (expected if node.op_type == "QuantizeLinear" else arrays[0]).dtype
    if qtype.name not in SUPPORTED:
        pytest.skip(f"{qtype.name} is not a questdeploy quantization type (int8/uint8/int4/uint4 only)")
    attrs = {a.name for a in node.attribute}
    if attrs - {"axis", "block_size", "output_dtype", "saturate"}:
        pytest.skip(f"attributes {sorted(attrs)} not modelled")
    bits, signed = SUPPORTED[qtype.name]
    scale = arrays[1]
    if scale.dtype != np.float32:
        pytest.skip(f"{scale.dtype} scales: questdeploy uses float32 scales")
    kw = _kwargs(node, scale)
    zp = torch.from_numpy(arrays[2].astype(np.int64)) if len(arrays) > 2 else None
    s = torch.from_numpy(scale.copy())
    if node.op_type == "QuantizeLinear":
        x = torch.from_numpy(arrays[0].copy())
        got = quantize(x, s, bits, signed, zero_point=zp, **kw)
        assert np.array_equal(got.numpy().astype(np.int64), expected.astype(np.int64)), (got, expected)
    else:
        q = torch.from_numpy(arrays[0].astype(np.int64))
        got = dequantize(q, s, zero_point=zp, **kw).numpy()
        assert got.dtype == expected.dtype
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (got, expected)  # bitwise


# --------------------------------------------------------------------------------------------------
# random inputs against onnx.reference (an oracle that shares no code with us), opset 21


_TP = {(8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
       (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4}


@pytest.mark.parametrize("bits,signed", list(_TP))
@pytest.mark.parametrize("gran", ["tensor", "axis", "block"])
def test_random_qdq_against_onnx_reference(bits, signed, gran):
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(bits * 10 + signed)
    x = (rng.standard_normal((4, 8)) * 5).astype(np.float32)
    x[0, :4] = [0.5, 1.5, -2.5, 1e9]  # ties and saturation
    if gran == "tensor":
        scale, kw, attrs = np.array(0.5, np.float32), {}, {}
    elif gran == "axis":
        scale, kw, attrs = rng.uniform(0.1, 1.0, 4).astype(np.float32), {"axis": 0}, {"axis": 0}
        scale[0] = 1.0
    else:
        scale = rng.uniform(0.1, 1.0, (4, 2)).astype(np.float32)
        scale[0, 0] = 1.0
        kw = attrs = {"axis": 1, "block_size": 4}
    qt = _TP[(bits, signed)]
    zp = helper.make_tensor("zp", qt, list(scale.shape), np.zeros(scale.shape, np.int64).ravel().tolist())
    sc = numpy_helper.from_array(scale, "scale")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x.shape)], initializer=[sc, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (y_ref,) = ReferenceEvaluator(model).run(None, {"x": x})
    s = torch.from_numpy(scale)
    ours = dequantize(quantize(torch.from_numpy(x), s, bits, signed, **kw), s, **kw).numpy()
    assert np.array_equal(ours.view(np.uint32), y_ref.astype(np.float32).view(np.uint32))
