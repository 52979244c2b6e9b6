"""Builder: command lines, the errors a user meets without TensorRT/GPU, and the build plumbing against a fake
``tensorrt`` module (the real build runs in tests/gpu)."""

from __future__ import annotations

import builtins
import shlex
import sys

import onnx
import pytest

import _fake_tensorrt
from _trt_graphs import unet_like
from questdeploy.engine import builder as B
from questdeploy.engine.errors import EngineBuildError, NoCudaDeviceError, TensorRTNotInstalledError
from questdeploy.engine.profiles import DimRange, load_profile


@pytest.fixture()
def onnx_file(tmp_path):
    p = tmp_path / "unet_trt.onnx"
    onnx.save(unet_like("trt"), str(p))
    return p


def _opts(onnx_file, tmp_path, **over):
    prof = load_profile("int8").with_overrides(batch="1:2:4", dims={"sequence": DimRange(1, 4, 8)}, **over)
    return B.BuildOptions.from_profile(onnx_file, tmp_path / "out" / "model.plan", prof, timing_cache=tmp_path / "t.cache")


def test_trtexec_command(onnx_file, tmp_path):
    cmd = B.trtexec_command(_opts(onnx_file, tmp_path))
    line = B.command_line(cmd)
    assert cmd[0] == "trtexec" and f"--onnx={onnx_file}" in cmd and "--stronglyTyped" in cmd
    assert "--minShapes=sample:1x4x8x8,timestep:1,encoder_hidden_states:1x1x16" in cmd
    assert "--optShapes=sample:2x4x8x8,timestep:2,encoder_hidden_states:2x4x16" in cmd
    assert "--maxShapes=sample:4x4x8x8,timestep:4,encoder_hidden_states:4x8x16" in cmd
    assert "--builderOptimizationLevel=3" in cmd and "--memPoolSize=workspace:4096M" in cmd
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in cmd and f"--saveEngine={tmp_path / 'out' / 'model.plan'}" in cmd
    assert "--fp16" not in cmd and "--int8" not in cmd  # strongly typed: no precision flags
    assert shlex.split(line) == cmd


def test_trtexec_refit_strip_and_fp16(onnx_file, tmp_path):
    cmd = B.trtexec_command(_opts(onnx_file, tmp_path, refit="refit", strip_weights=True))
    assert "--refit" in cmd and "--stripWeights" in cmd
    fp = B.BuildOptions.from_profile(onnx_file, tmp_path / "m.plan", load_profile("fp16"))
    cmd = B.trtexec_command(fp)
    assert "--fp16" in cmd and "--stronglyTyped" not in cmd


def test_polygraphy_convert_command(onnx_file, tmp_path):
    cmd = B.polygraphy_convert_command(_opts(onnx_file, tmp_path, strip_weights=True))
    assert cmd[:6] == ["polygraphy", "convert", str(onnx_file), "--convert-to", "trt", "-o"]
    assert "--strongly-typed" in cmd
    i = cmd.index("--trt-min-shapes")
    assert cmd[i + 1:i + 4] == ["sample:[1,4,8,8]", "timestep:[1]", "encoder_hidden_states:[1,1,16]"]
    assert cmd[cmd.index("--builder-optimization-level") + 1] == "3"
    assert cmd[cmd.index("--pool-limit") + 1] == "workspace:4096M"
    assert "--load-timing-cache" in cmd and "--save-timing-cache" in cmd and "--strip-plan" in cmd
    assert "'sample:[1,4,8,8]'" in B.command_line(cmd)  # brackets quoted for the shell


def test_missing_tensorrt_names_the_package_and_the_gpu(monkeypatch):
    real_import = builtins.__import__

    def no_trt(name, *a, **k):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_trt)
    with pytest.raises(TensorRTNotInstalledError) as e:
        B.import_tensorrt()
    text = e.value.one_line()
    assert "`tensorrt`" in text and "pip install questdeploy[gpu]" in text and "GPU" in text
    assert e.value.exit_code == 3


def test_placeholder_tensorrt_is_refused(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(TensorRTNotInstalledError, match="placeholder"):
        B.import_tensorrt()


def test_no_cuda_device(monkeypatch):
    monkeypatch.setattr(B, "cuda_devices", lambda: [])
    with pytest.raises(NoCudaDeviceError, match="no CUDA device"):
        B.require_cuda_device()


@pytest.fixture()
def fake_trt(monkeypatch):
    def install(**kw):
        trt = _fake_tensorrt.make(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(B, "cuda_devices", lambda: [B.CudaDevice(0, "Fake GPU", "8.9")])
        return trt

    return install


def test_build_plumbing_with_fake_tensorrt(fake_trt, onnx_file, tmp_path):
    trt = fake_trt()
    (tmp_path / "t.cache").write_bytes(b"OLD")
    opts = _opts(onnx_file, tmp_path, strip_weights=True)
    logs = []
    info = B.build_engine(opts, log=logs.append)
    c = trt.calls
    assert c["network_flags"] == 1 << 5  # STRONGLY_TYPED on TensorRT 10
    assert c["pool"] == {"WORKSPACE": 4096 << 20} and c["opt_level"] == 3
    assert c["profiles"][0]["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8))
    assert set(c["flags"]) == {"REFIT_IDENTICAL", "STRIP_PLAN"}
    assert c["timing_cache_in"] == b"OLD" and (tmp_path / "t.cache").read_bytes() == b"OLD+entries"
    assert c.get("progress") and any("Building" in s for s in logs)
    assert opts.plan_path.read_bytes().startswith(b"FAKEPLAN")
    assert not list(opts.plan_path.parent.glob(".model.plan.*"))  # no temp file left
    assert info["compute_capability"] == "8.9" and info["tensorrt_version"] == "10.8.0.43"


def test_tensorrt_11_needs_no_strong_flag_and_refuses_weak_fp16(fake_trt, onnx_file, tmp_path):
    trt = fake_trt(version="11.0.0.1")
    B.build_engine(_opts(onnx_file, tmp_path), log=lambda s: None)
    assert trt.calls["network_flags"] == 0
    fp = B.BuildOptions.from_profile(onnx_file, tmp_path / "m.plan", load_profile("fp16"))
    with pytest.raises(EngineBuildError) as e:
        B.build_engine(fp, log=lambda s: None)
    assert "no weak typing" in e.value.message and "--fp-to-fp16" in e.value.hint


def test_parser_errors_are_reported_in_full(fake_trt, onnx_file, tmp_path):
    fake_trt(parser_errors=["Assertion failed: scale must be constant", "second problem"])
    with pytest.raises(EngineBuildError) as e:
        B.build_engine(_opts(onnx_file, tmp_path), log=lambda s: None)
    msg = e.value.message
    assert "2 error(s)" in msg and "scale must be constant" in msg and "second problem" in msg
    assert "node=bad_node" in msg and "op=Conv" in msg
    assert not (tmp_path / "out" / "model.plan").exists()


def test_builder_failure_is_reported(fake_trt, onnx_file, tmp_path):
    fake_trt(build_fails=True)
    with pytest.raises(EngineBuildError, match="no implementation for layer bad_node"):
        B.build_engine(_opts(onnx_file, tmp_path), log=lambda s: None)


def test_rtx_ep_missing_package_is_a_typed_error(monkeypatch):
    import onnxruntime as ort

    from questdeploy.engine.rtx import register_rtx_ep

    monkeypatch.setitem(sys.modules, "onnxruntime_ep_nv_tensorrt_rtx", None)  # import fails
    with pytest.raises(TensorRTNotInstalledError, match="TensorRT-RTX EP is not installed") as e:
        register_rtx_ep(ort)
    assert "onnxruntime-ep-nv-tensorrt-rtx-cu12" in e.value.hint and e.value.exit_code == 3


def test_rtx_ep_unloadable_library_is_a_typed_error(monkeypatch, tmp_path):
    """A library onnxruntime cannot load (here: not a shared object at all) says what the EP needs."""
    import types

    import onnxruntime as ort

    from questdeploy.engine.rtx import register_rtx_ep

    lib = tmp_path / "libonnxruntime_providers_nv_tensorrt_rtx.so"
    lib.write_bytes(b"not an ELF file")
    fake = types.SimpleNamespace(get_ep_name=lambda: "QuestdeployTestRtxEP", get_library_path=lambda: str(lib))
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_nv_tensorrt_rtx", fake)
    with pytest.raises(NoCudaDeviceError, match="could not load the TensorRT-RTX EP") as e:
        register_rtx_ep(ort)
    assert "libcuda.so.1" in e.value.hint


def test_why_no_rtx_device_names_the_compute_capability(monkeypatch):
    import torch

    from questdeploy.engine.rtx import why_no_rtx_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    msg = why_no_rtx_device()
    assert "NVIDIA H200 has compute capability 9.0" in msg and "8.9" in msg and "build-engine" in msg
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 9))
    assert "/sys/class/drm" in why_no_rtx_device()
