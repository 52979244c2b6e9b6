"""TensorRT rule lint: one hand-built graph per rule that breaks exactly that rule, and a clean graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from _trt_graphs import G, clean
from questdeploy.engine import lint as L
from questdeploy.engine.graph import detect_form


def rules_hit(model, **kw):
    report = L.lint_model(model, polygraphy=False, **kw)
    return {f.rule for f in report.findings}, report


def test_clean_graph_passes_every_rule():
    m = clean()
    onnx.checker.check_model(m, full_check=True)
    hit, report = rules_hit(m)
    assert hit == set(), L.format_report(report)
    assert report.passed and report.verdict.startswith("PASS")
    assert report.form == "trt" and report.opset == 21
    assert set(report.rules_run) == set(L.RULES)


def _one_conv(g, x, *, act_kw=None, w_kw=None):
    return g.conv_w8(g.qdq_act(x, **(act_kw or {})), 4, 8)


def test_scale_not_constant_is_the_ort_form():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    grp = g.input("group", [], TensorProto.INT64)
    table = g.const(np.array([0.1, 0.2, 0.3], np.float16), p="table")
    s = g.node("Gather", [table, grp], p="gather", axis=0)
    y = g.conv_w8(g.qdq_act(x, scale_name=s), 4, 8)
    g.output(y, [1, 8, 8, 8])
    m = g.model()
    hit, report = rules_hit(m)
    assert hit == {"scale-not-constant"}
    assert len(report.errors) == 2  # the Q and the DQ
    assert all("Gather" in f.message and "--target trt" in f.fix for f in report.errors)
    assert detect_form(m).form == "ort"


def test_zero_point_nonzero():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    g.output(g.conv_w8(g.qdq_act(x, zp=3), 4, 8), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"zero-point"}
    assert "non-zero" in report.errors[0].message


def test_zero_point_not_constant():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    zp = g.input("zp", [], TensorProto.INT8)
    s = g.const(np.array(0.05, np.float16))
    q = g.node("QuantizeLinear", [x, s, zp])
    dq = g.node("DequantizeLinear", [q, s, zp])
    g.output(g.conv_w8(dq, 4, 8), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"zero-point"}
    assert "run time" in report.errors[0].message


def test_per_channel_activation():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    g.output(g.conv_w8(g.qdq_act(x, scale=np.full((4,), 0.05), axis=1), 4, 8), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"per-channel-activation"}
    assert len(report.errors) == 2 and "[4]" in report.errors[0].message


def test_int4_activation():
    g = G()
    z = g.input("context", [2, 16])
    g.output(g.matmul_w4(g.qdq_act(z, qtype="int4"), 16, 8), [2, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"int4-activation"}
    assert len(report.errors) == 1 and "weight-only" in report.errors[0].message


def test_int4_weight_on_conv():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    w = g.dq_weight(np.ones((8, 4, 3, 3), np.int8), np.full((8,), 0.01), TensorProto.INT4, axis=0)
    g.output(g.node("Conv", [g.qdq_act(x), w], pads=[1, 1, 1, 1]), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"int4-consumer"}
    assert "Conv" in report.errors[0].message


def test_int8_block_quantization():
    g = G()
    z = g.input("context", [2, 16])
    w = g.dq_weight(np.ones((16, 8), np.int8), np.full((2, 8), 0.01), axis=0, block_size=8)
    g.output(g.node("MatMul", [g.qdq_act(z), w]), [2, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"int8-block"}


def test_opset_too_old_for_int4_and_block_size():
    m = clean()
    m.opset_import[0].version = 19
    hit, report = rules_hit(m)
    assert hit == {"opset"}
    assert any("needs opset 21" in f.message for f in report.errors)


def test_opset_too_old_for_axis():
    # before opset 19 Q/DQ scales and DQ outputs are float32 only, so fp32-compute is true here too: set aside
    g = G(TensorProto.FLOAT)
    x = g.input("sample", [1, 4, 8, 8])
    g.output(g.conv_w8(g.qdq_act(x), 4, 8), [1, 8, 8, 8])
    hit, report = rules_hit(g.model(opset=10), disable=["fp32-compute"])
    assert hit == {"opset"}
    assert "needs opset 13" in report.errors[0].message


def test_unquantized_conv_input_is_a_warning():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    h = g.conv_w8(g.qdq_act(x), 4, 8)
    w = g.const(np.ones((8, 8, 3, 3), np.float16), p="wf")
    g.output(g.node("Conv", [h, w], p="float_conv", pads=[1, 1, 1, 1]), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"unquantized-input"}
    assert report.passed and len(report.warnings) == 1
    f = report.warnings[0]
    assert f.node.startswith("float_conv") and "input 0" in f.message and "input 1" in f.message


def test_residual_add_without_dq_input():
    g = G()
    x = g.input("sample", [1, 8, 8, 8])
    h = g.conv_w8(g.qdq_act(x), 8, 8)
    g.output(g.node("Add", [h, x], p="res"), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"residual-add"}
    assert report.warnings[0].node.startswith("res")


def test_custom_domain_op():
    m = clean()
    last = m.graph.output[0].name
    m.graph.node.append(onnx.helper.make_node("Gelu", [last], ["gelu_out"], name="ms_gelu", domain="com.microsoft"))
    m.graph.output[0].name = "gelu_out"
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    hit, report = rules_hit(m)
    assert hit == {"custom-domain"}
    assert report.errors[0].node == "ms_gelu"


def test_uint8_activation():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    g.output(g.conv_w8(g.qdq_act(x, qtype=np.uint8), 4, 8), [1, 8, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == {"uint8-activation"}
    assert len(report.errors) == 1


def test_float_weight_behind_qdq():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    w = g.qdq_act(g.const(np.ones((8, 4, 3, 3), np.float16), p="wf"), scale=np.full((8,), 0.01), axis=0)
    g.output(g.node("Conv", [g.qdq_act(x), w], pads=[1, 1, 1, 1]), [1, 8, 8, 8])
    hit, _ = rules_hit(g.model())
    assert hit == {"weight-not-integer"}


def test_fp32_graph_warns_once():
    hit, report = rules_hit(clean(TensorProto.FLOAT))
    assert hit == {"fp32-compute"} and len(report.findings) == 1 and report.passed


def test_float_graph_gets_no_placement_warnings():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    w = g.const(np.ones((4, 4, 3, 3), np.float16))
    h = g.node("Conv", [x, w], pads=[1, 1, 1, 1])
    g.output(g.node("Add", [h, x]), [1, 4, 8, 8])
    hit, report = rules_hit(g.model())
    assert hit == set() and report.form == "fp"


def test_disable_and_unknown_rule():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    g.output(g.conv_w8(g.qdq_act(x, zp=3), 4, 8), [1, 8, 8, 8])
    hit, _ = rules_hit(g.model(), disable=["zero-point"])
    assert hit == set()
    from questdeploy.engine.errors import ProfileError

    with pytest.raises(ProfileError):
        L.lint_model(g.model(), disable=["no-such-rule"], polygraphy=False)


def test_report_printer_names_node_problem_fix():
    g = G()
    x = g.input("sample", [1, 4, 8, 8])
    g.output(g.conv_w8(g.qdq_act(x, zp=3), 4, 8), [1, 8, 8, 8])
    report = L.lint_model(g.model(), polygraphy=False)
    text = L.format_report(report)
    assert "[zero-point]" in text and "problem:" in text and "fix:" in text
    assert text.strip().splitlines()[-1].startswith("verdict: FAIL")
    assert report.to_dict()["counts"]["error"] == 2


def test_polygraphy_lint_is_folded_in(tmp_path):
    """One subprocess run (a few seconds): a clean file gives no entries; an invalid one gives a checker error."""
    bad = clean()
    bad.graph.node[0].input[0] = "missing_tensor"  # dangling input: onnx.checker rejects it
    p = tmp_path / "bad.onnx"
    onnx.save(bad, str(p))
    report = L.lint_model(p)
    if not report.polygraphy.get("ran"):
        pytest.skip(f"polygraphy check lint could not run here: {report.polygraphy.get('skipped')}")
    pg = [f for f in report.findings if f.rule == "polygraphy-lint"]
    assert pg, L.format_report(report)
    assert not report.passed
