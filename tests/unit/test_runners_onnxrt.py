"""Runners: one interface over onnxruntime / onnx.reference / PyTorch, and the onnxruntime traps they avoid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from questdeploy.runners import OnnxRuntimeRunner, ReferenceRunner, TorchRunner, make_feed
from questdeploy.runners.onnxrt import session_options

rng = np.random.default_rng(0)


def _model(nodes, inits, inputs, outputs):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def int4_matmul_model():
    """x (M, 64) @ DQ(int4 W (64, 32), block 32 along K): onnxruntime fuses it into MatMulNBits."""
    import ml_dtypes

    w = rng.integers(-8, 8, (64, 32)).astype(np.int8)
    s = (rng.random((2, 32)) * 0.1 + 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(w.astype(ml_dtypes.int4), "W"), numpy_helper.from_array(s, "S")]
    nodes = [helper.make_node("DequantizeLinear", ["W", "S"], ["Wd"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "Wd"], ["y"])]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 32])])


def int8_transpose_matmul_model():
    """Activations Q/DQ int8 (zero point 0) -> Transpose -> MatMul with an int8 weight: the opset-21 pattern on
    which onnxruntime's QDQ propagation + QDQS8ToU8Transformer fail at session creation."""
    w = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.full(8, 0.02, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(8, np.int8), "wzp"), numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("Transpose", ["xd"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("DequantizeLinear", ["W", "ws", "wzp"], ["Wd"], axis=1),
             helper.make_node("MatMul", ["xt", "Wd"], ["y"])]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16, "S"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])])


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_int4_matmulnbits_is_exact_with_accuracy_level_0(tmp_path):
    m = int4_matmul_model()
    x = (rng.standard_normal((4, 64)) * 30).astype(np.float32)
    ref = ReferenceRunner(m).infer({"x": x})["y"]
    opt = tmp_path / "opt.onnx"
    ours = OnnxRuntimeRunner(m.SerializeToString(), optimization="all", optimized_model_path=str(opt)).infer({"x": x})["y"]
    assert "MatMulNBits" in _ops(opt)  # the fusion is kept ...
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)  # ... and exact
    # what the setting prevents: onnxruntime's default quantizes activations to int8 inside MatMulNBits
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    plain = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    print("default-session max abs error:", float(np.abs(plain - ref).max()))


def test_int8_opset21_session_creates_and_keeps_fusion(tmp_path):
    m = int8_transpose_matmul_model()
    x = rng.standard_normal((2, 16, 5)).astype(np.float32)
    ref = ReferenceRunner(m).infer({"x": x})["y"]
    opt = tmp_path / "opt.onnx"
    got = OnnxRuntimeRunner(m.SerializeToString(), optimization="all", optimized_model_path=str(opt)).infer({"x": x})["y"]
    assert "MatMulIntegerToFloat" in _ops(opt)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the trap itself (documented in runners/onnxrt.py): a plain session fails to load at level ALL
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail type
        assert "zero_point" in str(e) or "INT8" in str(e)


@pytest.mark.parametrize("level", ["off", "basic", "extended", "all"])
def test_optimization_levels_and_threads(level):
    m = int8_transpose_matmul_model()
    r = OnnxRuntimeRunner(m.SerializeToString(), optimization=level, threads=1)
    x = rng.standard_normal((1, 16, 3)).astype(np.float32)
    with r:
        assert r.infer({"x": x})["y"].shape == (1, 3, 8)
        assert r.inference_time is not None and r.inference_time >= 0
    assert r.session is None and not r.is_active
    so = session_options(level, threads=1)
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"


def test_bad_optimization_level():
    with pytest.raises(ValueError, match="optimization"):
        OnnxRuntimeRunner(b"", optimization="max")


def test_runner_feed_normalisation_and_output_selection():
    m = int4_matmul_model()
    r = OnnxRuntimeRunner(m.SerializeToString(), outputs=["y"])
    out = r.infer({"x": torch.randn(2, 64), "unused": np.zeros(3)})  # torch in, extra keys ignored
    assert set(out) == {"y"} and isinstance(out["y"], np.ndarray)
    feed = make_feed(torch.zeros(2, 1, 4, 4), 7, None)
    assert feed["timestep"].dtype == np.float32 and feed["timestep"].shape == (1,)
    assert "encoder_hidden_states" not in feed


def test_torch_runner_and_eps_adapter_drive_the_shared_sampler():
    from questdeploy.export.testing import tiny_uncond_unet
    from questdeploy.sampling import ddim_sample

    unet = tiny_uncond_unet()
    r = TorchRunner(unet)
    assert not r.conditional
    x = torch.randn(2, 1, 8, 8)
    out = r.infer(make_feed(x, 500.0))["out_sample"]
    with torch.no_grad():
        np.testing.assert_allclose(out, unet(x, torch.tensor([500.0, 500.0])).sample.numpy(), rtol=1e-6, atol=1e-6)
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}
    img = ddim_sample(r.eps, cfg, torch.randn(2, 1, 8, 8), None, steps=3)
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()
