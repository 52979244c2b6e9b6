"""Real TensorRT builds (GPU only): a tiny hand-made Q/DQ conv graph and the trt-form export, compared with
onnxruntime on CPU. Skipped, with the reason, where `tensorrt` cannot be imported or no CUDA device exists.

Run: ``pytest -m gpu tests/gpu/test_engine_gpu.py -v``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _trt_graphs import unet_like  # noqa: E402

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
    except Exception as e:  # pragma: no cover
        return f"torch unusable: {e}"
    try:
        trt = importlib.import_module("tensorrt")
        if not hasattr(trt, "Builder"):
            return "`tensorrt` is a placeholder package without the TensorRT libraries"
    except Exception as e:
        return f"`import tensorrt` failed ({type(e).__name__}: {e}); pip install questdeploy[gpu] on a CUDA host"
    return None


_REASON = _skip_reason()
needs_trt = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _feeds(n_steps=3, batch=2, seq=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{
        "sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
        "timestep": np.full((batch,), t, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, seq, 16)).astype(np.float32),
    } for t in np.linspace(999, 1, n_steps)]


def _ort(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ reference
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return [dict(zip([o.name for o in s.get_outputs()], s.run(None, {k: v for k, v in f.items() if k in names}))) for f in feeds]


@needs_trt
def test_tiny_int8_engine_matches_onnxruntime(tmp_path):
    from questdeploy.engine.manifest import load_manifest
    from questdeploy.engine.runner import compare_outputs, run_plan
    from questdeploy.engine.stage import build_engine_stage

    path = tmp_path / "tiny_trt.onnx"
    onnx.save(unet_like("trt", onnx.TensorProto.FLOAT), str(path))
    out = build_engine_stage(path, tmp_path / "eng", "int8", batch="1:2:4", dims=["sequence=1:4:8"],
                             polygraphy_lint=False, triton_repo=tmp_path / "repo")
    man = load_manifest(out["manifest"])
    assert man["gpu"]["compute_capability"] and man["tensorrt"]["version"]
    feeds = _feeds()
    comp = compare_outputs(_ort(path, feeds), run_plan(out["plan"], feeds), feeds)
    w = comp.worst()
    print("tiny int8 engine vs onnxruntime:", w)
    assert w["rel_l2"] < 2e-2 and w["cosine_min"] > 0.999


@needs_trt
def test_wrong_gpu_manifest_is_refused(tmp_path):
    import json

    from questdeploy.engine.errors import EngineIncompatibleError
    from questdeploy.engine.runner import run_plan
    from questdeploy.engine.stage import build_engine_stage

    path = tmp_path / "tiny_trt.onnx"
    onnx.save(unet_like("trt", onnx.TensorProto.FLOAT), str(path))
    out = build_engine_stage(path, tmp_path / "eng", "int8", batch="1:1:2", dims=["sequence=4:4:4"], polygraphy_lint=False)
    man = json.loads(Path(out["manifest"]).read_text())
    man["gpu"]["compute_capability"] = "1.0"
    Path(out["manifest"]).write_text(json.dumps(man))
    with pytest.raises(EngineIncompatibleError):
        run_plan(out["plan"], _feeds(1, 1))


@needs_trt
def test_trt_form_export_builds_and_matches(tmp_path, tiny_cond_pipeline):
    """The trt-form export of a tiny quantized UNet: lint, build, compare with onnxruntime per timestep."""
    export = pytest.importorskip("questdeploy.export.onnx_export")
    from diffusers import UNet2DConditionModel

    from questdeploy.engine.lint import lint_model
    from questdeploy.engine.runner import compare_outputs, run_plan
    from questdeploy.engine.stage import build_engine_stage
    from questdeploy.quant.wrap import QuantConfig, quantize_unet

    q = quantize_unet(UNet2DConditionModel.from_pretrained(tiny_cond_pipeline / "unet"), QuantConfig(w_bits=8, a_bits=8, num_groups=4))
    path = tmp_path / "unet_trt.onnx"
    export.export_onnx(q, path, target="trt")
    report = lint_model(path, polygraphy=False)
    if not report.passed:
        pytest.xfail("trt-form export breaks TensorRT rules: " + ", ".join(sorted({f.rule for f in report.errors})))
    out = build_engine_stage(path, tmp_path / "eng", "int8", batch="1:2:4", dims=["sequence=1:2:4"], polygraphy_lint=False)
    rng = np.random.default_rng(0)
    feeds = [{"sample": rng.standard_normal((2, 1, 8, 8)).astype(np.float32), "timestep": np.full((2,), t, np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 2, 16)).astype(np.float32)} for t in (999.0, 600.0, 200.0, 1.0)]
    comp = compare_outputs(_ort(path, feeds), run_plan(out["plan"], feeds), feeds)
    print("trt-form export engine vs onnxruntime:", comp.worst())
    assert comp.worst()["cosine_min"] > 0.99  # random-weight UNet: LSB flips amplify (see trt-qdq-rules.md)


def test_tensorrt_rtx_ep_runs_the_trt_form(tmp_path):
    """TensorRT-RTX through onnxruntime's plugin EP API (engines/README.md): the whole hand-made trt-form graph
    on the EP (no CPU fallback), per timestep against onnxruntime CPU. Skips without the wheel or a GPU."""
    pytest.importorskip("onnxruntime_ep_nv_tensorrt_rtx", reason="onnxruntime-ep-nv-tensorrt-rtx-cu12 not installed")
    import onnxruntime as ort

    from questdeploy.engine.errors import NoCudaDeviceError
    from questdeploy.engine.rtx import register_rtx_ep, why_no_rtx_device
    from questdeploy.engine.runner import compare_outputs

    try:
        _, devices = register_rtx_ep(ort)
    except NoCudaDeviceError as e:
        pytest.skip(str(e))
    if not devices:
        pytest.skip(f"the TensorRT-RTX EP offers no device: {why_no_rtx_device()}")
    path = tmp_path / "tiny_trt.onnx"
    onnx.save(unet_like("trt", onnx.TensorProto.FLOAT), str(path))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # every node on TensorRT-RTX
    so.add_provider_for_devices(devices, {})
    sess = ort.InferenceSession(str(path), sess_options=so)
    feeds = _feeds(3)
    got = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f))) for f in feeds]
    w = compare_outputs(_ort(path, feeds), got, feeds).worst()
    print("TensorRT-RTX EP vs onnxruntime CPU:", w)
    assert w["cosine_min"] > 0.99
