"""The ``ort-int`` form (export/ort_integer.py): Convs and weight MatMuls as im2col + integer GEMMs.

Hand-built one-layer graphs (milliseconds) cover the conv geometries: 1x1, 3x3, stride 2, symmetric and
asymmetric padding, non-square kernels and inputs. Each rewritten layer must equal the float layer on the *same*
quantized input (teacher-forced) to a relative 1e-6 (int32 accumulation is exact; what remains is the float32
rescale), at onnxruntime optimization off (MatMulInteger / Cast / Mul / Add as written) and all (fused into
MatMulIntegerToFloat). The tiny traced UNets check the whole form: every conv rewritten, quantizers unchanged,
end-to-end agreement with the ``ort`` form, metadata, refusals and the TensorRT lint.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from questdeploy.engine.graph import detect_form
from questdeploy.engine.lint import lint_model
from questdeploy.engine.stage import build_engine_stage
from questdeploy.errors import QuestDeployError
from questdeploy.export import lower_marked, markers, save_onnx, check_onnx, trace
from questdeploy.export.ort_integer import (
    DynamicSpatialShapeError, OrtIntegerError, expand_contrib_ops, im2col_index, integerize,
)
from questdeploy.export.qdq import ActParams, WeightParams, get_metadata, lower
from questdeploy.export.testing import cached, calibrate_random, tiny_cond_unet, tiny_uncond_unet
from questdeploy.export.verify import (
    compare_arrays, integer_layer_exactness, quantizer_exactness, with_outputs,
)
from questdeploy.quant import QuantConfig, quantize_unet
from questdeploy.quant.primitives import TimestepBins, quantize
from questdeploy.runners import OnnxRuntimeRunner, ReferenceRunner, make_feed

EDGES = [0.0, 250.0, 500.0, 750.0, 1000.0]
ACT_SCALES = np.array([0.02, 0.03, 0.04, 0.06], np.float32)
rng = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------- one layer


def _marker(x, key, y):
    return helper.make_node(markers.MARKER_OP, [x], [y], domain=markers.MARKER_DOMAIN, **{markers.MARKER_ATTR: key})


def _wparams(key, w):
    axis_shape = (w.shape[0], -1)
    s = (np.abs(w.reshape(axis_shape)).max(1) / 127).astype(np.float32)
    fn = lambda arr, s=s: quantize(torch.from_numpy(arr), torch.from_numpy(s), 8, True, out_dtype=torch.int8, axis=0).numpy()  # noqa: E731
    return WeightParams(key, 8, s, None, fn)


def conv_model(ci, co, h, w, k, stride, pads, bias=True, static=False, ops="standard", act=True):
    """sample [N, ci, h, w] -> [m] Conv(W [m], bias) -> y, lowered to ``ort`` then rewritten to ``ort-int``."""
    markers._register()
    kh, kw = k
    wc = rng.standard_normal((co, ci, kh, kw)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(wc, "W")]
    conv_in = ["xm", "wm"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "B"))
        conv_in.append("B")
    nodes = [_marker("sample", "conv.input_quantizer", "xm"), _marker("W", "conv.weight_quantizer", "wm"),
             helper.make_node("Conv", conv_in, ["y"], kernel_shape=[kh, kw], strides=list(stride), pads=list(pads), name="conv")]
    g = helper.make_graph(nodes, "one_conv", [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["N", ci, h, w]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["T"]),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(markers.MARKER_DOMAIN, 1)])
    m.ir_version = 10
    params = {"conv.input_quantizer": ActParams("conv.input_quantizer", 8, True, ACT_SCALES.copy(), enabled=act),
              "conv.weight_quantizer": _wparams("conv.weight_quantizer", wc)}
    ort_form, _ = lower(m, params, "ort", timestep_edges=EDGES, static_scales=static)
    return ort_form, integerize(ort_form, ops=ops)


def _run(model: onnx.ModelProto, feed, optimization, extra=()):
    ext = with_outputs(model, list(extra), {n: TensorProto.UINT8 for n in extra})
    return OnnxRuntimeRunner(ext.SerializeToString(), optimization=optimization).activate().infer(feed)


def _float_conv(ort_form: onnx.ModelProto, xq: np.ndarray, s: float, stride, pads) -> np.ndarray:
    """float64 conv of the dequantized input with the ``ort`` form's own dequantized weight (+ bias)."""
    inits = {t.name: numpy_helper.to_array(t) for t in ort_form.graph.initializer}
    dqw = next(n for n in ort_form.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    w = inits[dqw.input[0]].astype(np.float64) * inits[dqw.input[1]].astype(np.float64).reshape(-1, 1, 1, 1)
    conv = next(n for n in ort_form.graph.node if n.op_type == "Conv")
    b = torch.from_numpy(inits[conv.input[2]].astype(np.float64)) if len(conv.input) > 2 else None
    x = torch.from_numpy((xq.astype(np.float64) - 128.0) * s)
    x = torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return torch.nn.functional.conv2d(x, torch.from_numpy(w), b, stride=stride).numpy()


GEOMETRIES = {
    "1x1": dict(ci=8, co=6, h=5, w=5, k=(1, 1), stride=(1, 1), pads=(0, 0, 0, 0)),
    "1x1-stride2": dict(ci=8, co=6, h=6, w=6, k=(1, 1), stride=(2, 2), pads=(0, 0, 0, 0)),
    "3x3-pad1": dict(ci=5, co=7, h=6, w=9, k=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1)),
    "3x3-stride2-pad1": dict(ci=4, co=8, h=8, w=8, k=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),
    "3x3-stride2-asym": dict(ci=4, co=8, h=7, w=8, k=(3, 3), stride=(2, 2), pads=(0, 0, 1, 1)),
    "5x3-nobias": dict(ci=3, co=4, h=9, w=7, k=(5, 3), stride=(1, 2), pads=(2, 1, 2, 1), bias=False),
    "3x3-valid": dict(ci=16, co=32, h=6, w=6, k=(3, 3), stride=(1, 1), pads=(0, 0, 0, 0)),
}


@pytest.mark.parametrize("ops", ["standard", "com.microsoft"])
@pytest.mark.parametrize("geo", list(GEOMETRIES))
def test_integer_conv_is_exact_given_its_quantized_input(geo, ops):
    cfg = GEOMETRIES[geo]
    ort_form, (m, rep) = conv_model(**cfg, ops=ops)
    assert rep.convs == 1 and not rep.kept
    ops_used = collections.Counter(n.op_type for n in m.graph.node)
    assert "Conv" not in ops_used and "DequantizeLinear" not in ops_used  # both DQs retired: integers all the way
    assert ops_used["MatMulInteger" if ops == "standard" else "MatMulIntegerToFloat"] == 1
    simple = cfg["k"] == (1, 1) and cfg["stride"] == (1, 1)
    im2col = [n for n in m.graph.node if n.op_type == "Gather" and n.name.endswith("/Im2col")]
    assert len(im2col) == (0 if simple else 1)  # the 1x1 stride-1 conv needs no im2col gather
    q_name = next(n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear")
    for t in (100.0, 900.0):
        feed = {"sample": rng.standard_normal((2, cfg["ci"], cfg["h"], cfg["w"])).astype(np.float32) * 1.5,
                "timestep": np.array([t], np.float32)}
        s = float(ACT_SCALES[TimestepBins(tuple(EDGES)).group(t)])
        for opt in ("off", "all"):
            got = _run(m, feed, opt, [q_name])
            ref = _float_conv(ort_form, got[q_name], s, cfg["stride"], cfg["pads"])
            assert got["y"].shape == ref.shape
            rel = np.abs(got["y"] - ref).max() / np.abs(ref).max()
            assert rel <= 1e-6, (geo, ops, opt, t, rel)
            assert (got[q_name] != 128).any()  # the test feeds real values, not all zeros


def test_standard_ops_are_fused_into_matmul_integer_to_float(tmp_path):
    """onnxruntime (extended / all) turns MatMulInteger -> Cast -> Mul(Mul(s_x, w_s)) -> Add(bias) into one kernel."""
    _, (m, _) = conv_model(**GEOMETRIES["3x3-pad1"])
    assert {n.domain for n in m.graph.node} == {""}
    feed = {"sample": np.ones((1, 5, 6, 9), np.float32), "timestep": np.array([10.0], np.float32)}
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    OnnxRuntimeRunner(path, optimization="all", optimized_model_path=str(tmp_path / "opt.onnx")).activate().infer(feed)
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == 1 and not ops["MatMulInteger"] and not ops["Add"]  # bias folded in too


def test_auto_ops_use_the_contrib_op_only_for_static_scales():
    """With constant scales onnxruntime folds Mul(s_x, w_s) before the fusion runs, so static models get the op itself."""
    _, (m, rep) = conv_model(**GEOMETRIES["1x1"], ops="auto")
    assert rep.ops == "standard" and get_metadata(m)["integer_ops"] == "standard"
    _, (m, rep) = conv_model(**GEOMETRIES["1x1"], ops="auto", static=True)
    meta = get_metadata(m)
    assert rep.ops == "com.microsoft" and meta["integer_ops"] == "com.microsoft" and meta["runtime"] == "onnxruntime"
    assert any(o.domain == "com.microsoft" for o in m.opset_import)
    expanded = expand_contrib_ops(m)
    assert {n.domain for n in expanded.graph.node} == {""} and all(o.domain != "com.microsoft" for o in expanded.opset_import)
    feed = {"sample": rng.standard_normal((2, 8, 5, 5)).astype(np.float32), "timestep": np.array([600.0], np.float32)}
    a = _run(m, feed, "all")["y"]
    b = ReferenceRunner(expanded).activate().infer(feed)["y"]
    assert compare_arrays(a, b)["rel_l2"] < 1e-6


def test_im2col_index_is_int32_and_shared():
    idx = im2col_index(4, 4, 3, 3, (1, 1), (1, 1, 1, 1))
    assert idx.dtype == np.int32 and idx.size == 16 * 9
    assert idx[:9].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]  # output (0, 0): the padded 3x3 corner, row stride 6
    _, (m, rep) = conv_model(**GEOMETRIES["3x3-pad1"])
    gather = next(n for n in m.graph.node if n.op_type == "Gather" and n.name.endswith("/Im2col"))
    init = next(t for t in m.graph.initializer if t.name == gather.input[1])
    assert init.data_type == TensorProto.INT32 and rep.index_bytes == 6 * 9 * 9 * 4


def test_dynamic_spatial_dims_are_refused():
    ort_form, _ = conv_model(**GEOMETRIES["3x3-pad1"])
    dims = ort_form.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    with pytest.raises(DynamicSpatialShapeError) as e:
        integerize(ort_form)
    assert isinstance(e.value, QuestDeployError) and "height" in e.value.message and "--target ort" in e.value.hint


def test_a_model_without_8bit_activations_is_refused():
    with pytest.raises(OrtIntegerError, match="no Conv / MatMul") as e:
        conv_model(**GEOMETRIES["1x1"], act=False)  # weight-only: DQ(W) -> float Conv, nothing to rewrite
    assert "--target ort" in e.value.hint


def test_only_the_ort_form_is_rewritten():
    ort_form, _ = conv_model(**GEOMETRIES["1x1"])
    done, _ = integerize(ort_form)
    with pytest.raises(OrtIntegerError, match="'ort' form"):
        integerize(done)


# ----------------------------------------------------------------------------------------------- tiny UNets

G = 4


def _qunet(kind: str):
    def build():
        base = tiny_cond_unet() if kind == "cond" else tiny_uncond_unet()
        q = quantize_unet(base, QuantConfig(num_groups=G, w_bits=8, a_bits=8))
        calibrate_random(q, per_group=1)
        return q

    return cached(("qunet", kind, "w8a8"), build)  # the same key and model as test_export_onnx: one trace per session


def _exported(tmp_path_factory, kind, form, static=False):
    def build():
        m, rep = lower_marked(cached(("marked", kind), lambda: trace(_qunet(kind))), form, static_scales=static,
                              params_from=_qunet(kind))
        path = tmp_path_factory.mktemp("onnx") / f"{kind}_{form}{'_static' if static else ''}.onnx"
        save_onnx(m, path)
        check_onnx(path)
        return path, rep

    return cached(("exported", kind, "w8a8", form, static), build)


def _feed(kind, t, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    c = torch.randn(batch, 4, 16, generator=g) if kind == "cond" else None
    return make_feed(x, np.array([t], np.float32), c)


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True], ids=["per_timestep", "static"])
@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_every_conv_and_weight_matmul_is_an_exact_integer_gemm(tmp_path_factory, kind, static):
    path, rep = _exported(tmp_path_factory, kind, "ort-int", static)
    m = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Conv"] == 0 and rep.integer["convs"] > 20 and rep.integer["linears"] > 10
    assert set(rep.integer["kept"].values()) == {"second operand is not a constant weight (activation x activation, e.g. attention)"}
    q = _qunet(kind)
    for t in (40.0, 700.0):
        for opt in ("off", "all"):
            rows = integer_layer_exactness(path, q, _feed(kind, t), optimization=opt)
            assert len(rows) == rep.integer["convs"] + rep.integer["linears"]
            assert max(r["rel_err"] for r in rows) <= 1e-6, max(rows, key=lambda r: r["rel_err"])
        ex = quantizer_exactness(path, q, _feed(kind, t))
        assert ex and sum(r["mismatches"] for r in ex) == 0  # the activation quantizers are the ort form's, untouched


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_whole_unet_matches_the_ort_form(tmp_path_factory, kind):
    """End to end the two forms differ only in float summation order inside each conv; a value that lands within
    an ulp of a rounding boundary of the next quantizer then flips one LSB, and random weights spread it. Bound:
    relative L2 <= 0.05 (verify's per-call tolerance; measured <= 0.022 over these feeds, ~1e-7 when no boundary is
    hit), and where the quantized activations first differ, they differ by one LSB on < 1 % of the elements."""
    p_ort, rep = _exported(tmp_path_factory, kind, "ort")
    p_int, _ = _exported(tmp_path_factory, kind, "ort-int")
    qt = json.loads(get_metadata(onnx.load(str(p_ort), load_external_data=False))["quant_tensors"])
    order = {n.output[0]: i for i, n in enumerate(onnx.load(str(p_ort)).graph.node)}
    qs = sorted((v["q"] for v in qt.values() if v["bits"] == 8), key=lambda n: order[n])
    for i, t in enumerate([5.0, 260.0, 600.0, 990.0]):
        feed = _feed(kind, t, batch=3, seed=i)
        for opt in ("off", "all"):
            a = _run(onnx.load(str(p_ort)), feed, opt, qs)
            b = _run(onnx.load(str(p_int)), feed, opt, qs)
            assert compare_arrays(a["out_sample"], b["out_sample"])["rel_l2"] <= 0.05
            first = next((n for n in qs if (a[n] != b[n]).any()), None)
            if first is not None:
                d = np.abs(a[first].astype(np.int32) - b[first].astype(np.int32))
                assert d.max() == 1 and (d > 0).mean() < 0.01, (first, d.max(), (d > 0).mean())


@pytest.mark.slow
def test_metadata_records_the_form(tmp_path_factory):
    path, rep = _exported(tmp_path_factory, "cond", "ort-int")
    meta = get_metadata(onnx.load(str(path), load_external_data=False))
    assert meta["form"] == "ort-int" and meta["base_form"] == "ort" and meta["integer_ops"] == "standard"
    assert json.loads(meta["spatial_size"]) == [8, 8]
    layers = json.loads(meta["integer_layers"])
    assert len(layers) == rep.integer["convs"] + rep.integer["linears"] and {e["kind"] for e in layers} == {"conv", "linear"}
    qt = json.loads(meta["quant_tensors"])
    rewritten = [k for k, v in qt.items() if v.get("integer_gemm")]
    assert len(rewritten) == len(layers) and all(qt[k]["tensor"] is None for k in rewritten)
    assert rep.form == "ort-int" and rep.to_dict()["integer"]["convs"] == rep.integer["convs"]
    m = onnx.load(str(path))
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}  # per-timestep: standard ops only
    static_path, _ = _exported(tmp_path_factory, "cond", "ort-int", static=True)
    smeta = get_metadata(onnx.load(str(static_path), load_external_data=False))
    assert smeta["integer_ops"] == "com.microsoft" and smeta["runtime"] == "onnxruntime"
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays symbolic


@pytest.mark.slow
def test_tensorrt_lint_refuses_the_ort_int_form(tmp_path_factory, tmp_path):
    for static in (False, True):
        path, _ = _exported(tmp_path_factory, "cond", "ort-int", static)
        assert detect_form(onnx.load(str(path))).form == "ort-int"
        report = lint_model(path, polygraphy=False)
        hits = [f for f in report.errors if f.rule == "ort-int-form"]
        assert not report.passed and len(hits) == 1 and hits[0].fix == "export with `--target trt`"
        assert all("--target trt" in f.fix for f in report.errors)  # incl. MatMulInteger / com.microsoft nodes
        out = build_engine_stage(path, tmp_path / f"eng{static}", "int8", check_only=True, polygraphy_lint=False, progress=False,
                                 log=lambda s: None)
        prof = [f for f in out["lint"]["findings"] if f["rule"] == "profile"]
        assert out["form"] == "ort-int" and prof and "--target trt" in prof[0]["fix"]
    from questdeploy.engine.errors import WrongOnnxFormError

    with pytest.raises(WrongOnnxFormError) as e:
        build_engine_stage(path, tmp_path / "eng", "int8", polygraphy_lint=False, progress=False, log=lambda s: None)
    assert "--target trt" in e.value.hint
