"""The build-engine stage without TensorRT: lint first, --check-only, command lines on disk, typed errors."""

from __future__ import annotations

import builtins
import json
import sys

import onnx
import pytest

import _fake_tensorrt
from _trt_graphs import unet_like
from questdeploy.engine import builder as B
from questdeploy.engine.errors import LintFailedError, TensorRTNotInstalledError, WrongOnnxFormError
from questdeploy.engine.stage import build_engine_stage


def _save(tmp_path, form, name=None):
    p = tmp_path / (name or f"unet_{form}.onnx")
    onnx.save(unet_like(form), str(p))
    return p


@pytest.fixture()
def no_tensorrt(monkeypatch):
    real_import = builtins.__import__

    def imp(name, *a, **k):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", imp)


KW = dict(dims=["sequence=1:4:8"], polygraphy_lint=False, log=lambda s: None)


def test_check_only_passes_trt_form(tmp_path):
    out = build_engine_stage(_save(tmp_path, "trt"), tmp_path / "eng", "int8", check_only=True, **KW)
    assert out["lint"]["passed"] and out["form"] == "trt" and out["check_only"]
    assert (tmp_path / "eng" / "lint.txt").read_text().strip().endswith("PASS: no TensorRT rule broken")
    assert json.loads((tmp_path / "eng" / "lint.json").read_text())["passed"]
    sh = (tmp_path / "eng" / "build_commands.sh").read_text()
    assert "trtexec --onnx=" in sh and "--stronglyTyped" in sh and "polygraphy convert" in sh
    assert not (tmp_path / "eng" / "model.plan").exists()


def test_check_only_names_blocking_nodes_of_the_ort_form(tmp_path):
    out = build_engine_stage(_save(tmp_path, "ort"), tmp_path / "eng", "int8", check_only=True, **KW)
    lint = out["lint"]
    assert not lint["passed"] and lint["form"] == "ort"
    rules = {f["rule"] for f in lint["findings"] if f["severity"] == "error"}
    assert rules == {"scale-not-constant", "profile"}
    nodes = {f["node"] for f in lint["findings"] if f["rule"] == "scale-not-constant"}
    assert len(nodes) == 2 and all(n.startswith(("q", "dq")) for n in nodes)


def test_profile_mismatch_is_a_lint_error(tmp_path):
    out = build_engine_stage(_save(tmp_path, "fp"), tmp_path / "eng", "int8", check_only=True, **KW)
    assert [f["rule"] for f in out["lint"]["findings"]] == ["profile"]
    out = build_engine_stage(_save(tmp_path, "trt"), tmp_path / "eng2", "int4", check_only=True, **KW)
    assert "INT4" in out["lint"]["findings"][0]["message"]
    out = build_engine_stage(_save(tmp_path, "fp"), tmp_path / "eng3", "fp16", check_only=True, **KW)
    assert out["lint"]["passed"]


def test_without_tensorrt_the_typed_error_comes_after_lint_and_commands(tmp_path, no_tensorrt):
    with pytest.raises(TensorRTNotInstalledError) as e:
        build_engine_stage(_save(tmp_path, "trt"), tmp_path / "eng", "int8", **KW)
    assert "`tensorrt`" in e.value.one_line()
    assert (tmp_path / "eng" / "lint.txt").is_file() and (tmp_path / "eng" / "build_commands.sh").is_file()


def test_ort_form_is_refused_with_the_fix(tmp_path, no_tensorrt):
    with pytest.raises(WrongOnnxFormError) as e:
        build_engine_stage(_save(tmp_path, "ort"), tmp_path / "eng", "int8", **KW)
    assert "--target trt" in e.value.hint


def test_lint_errors_block_the_build(tmp_path, no_tensorrt):
    m = unet_like("trt")
    for init in m.graph.initializer:
        if init.name.startswith("zp"):
            init.raw_data = b"\x03" * len(init.raw_data) if init.raw_data else init.raw_data
            if not init.raw_data:
                init.int32_data[:] = [3] * len(init.int32_data)
    p = tmp_path / "bad.onnx"
    onnx.save(m, str(p))
    with pytest.raises(LintFailedError) as e:
        build_engine_stage(p, tmp_path / "eng", "int8", **KW)
    assert e.value.report.errors and e.value.report.errors[0].rule == "zero-point"


def test_full_stage_with_fake_tensorrt(tmp_path, monkeypatch):
    trt = _fake_tensorrt.make()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(B, "cuda_devices", lambda: [B.CudaDevice(0, "Fake GPU", "8.9")])
    monkeypatch.setenv("QUESTDEPLOY_CACHE", str(tmp_path / "cache"))
    onnx_path = _save(tmp_path, "trt")
    out = build_engine_stage(onnx_path, tmp_path / "eng", "int8", batch="1:2:4", triton_repo=tmp_path / "repo", **KW)
    man = json.loads((tmp_path / "eng" / "engine.json").read_text())
    assert man["gpu"]["compute_capability"] == "8.9" and man["profile"]["name"] == "int8"
    assert man["shape_profiles"][0]["sample"]["max"] == [4, 4, 8, 8]
    assert (tmp_path / "repo" / "quest_unet" / "config.pbtxt").is_file()
    assert (tmp_path / "cache" / "timing-trt10.8.0.43-sm89.cache").is_file()
    assert out["plan"].endswith("model.plan") and out["triton"].endswith("quest_unet")
