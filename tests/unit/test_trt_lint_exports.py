"""Our own `trt`-form exports pass the TensorRT lint at W8A8 and W4A8; W4A4 and the `ort` form are named."""

from __future__ import annotations

import pytest

from questdeploy.engine.lint import lint_model
from questdeploy.export import check_onnx, lower_marked, save_onnx, trace
from questdeploy.export.testing import cached, calibrate_random, tiny_cond_unet
from questdeploy.quant import QuantConfig, quantize_unet

pytestmark = pytest.mark.slow

CONFIGS = {
    "w8a8": dict(w_bits=8, a_bits=8),
    "w4a8": dict(w_bits=4, a_bits=8, weight_granularity="per_block", block_size=16),
    "w4a4": dict(w_bits=4, a_bits=4, weight_granularity="per_block", block_size=16),
}


def _qunet(cfg: str, target: str):
    def build():
        q = quantize_unet(tiny_cond_unet(), QuantConfig(num_groups=3, target=target, **CONFIGS[cfg]))
        calibrate_random(q, per_group=1)
        return q

    return cached(("lint-qunet", cfg, target), build)


def _export(tmp_path_factory, cfg: str, form: str):
    target = "ort" if (form == "ort" or cfg == "w4a4") else "trt"  # TensorRT targets refuse 4-bit activations
    marked = cached(("lint-marked",), lambda: trace(_qunet("w8a8", "trt")))
    model, report = lower_marked(marked, form, params_from=_qunet(cfg, target))
    path = tmp_path_factory.mktemp("lint") / f"{cfg}_{form}.onnx"
    save_onnx(model, path)
    check_onnx(path)
    return path, report


@pytest.mark.parametrize("cfg", ["w8a8", "w4a8"])
def test_trt_form_passes_the_lint(tmp_path_factory, cfg):
    path, report = _export(tmp_path_factory, cfg, "trt")
    lint = lint_model(path, polygraphy=False)
    assert lint.passed, [f"{f.rule} {f.node}: {f.message}" for f in lint.errors][:10]
    if cfg == "w4a8":
        assert report.int4_widened > 0  # the 4-bit convs are stored on the INT8 grid for TensorRT


def test_w4a4_trt_form_names_every_int4_activation(tmp_path_factory):
    path, _ = _export(tmp_path_factory, "w4a4", "trt")
    lint = lint_model(path, polygraphy=False)
    int4_act = [f for f in lint.errors if "int4" in f.rule.lower() and "act" in f.rule.lower()]
    assert not lint.passed and int4_act
    assert all(f.node and f.fix for f in int4_act)


def test_ort_form_is_refused_with_the_fix(tmp_path_factory):
    path, _ = _export(tmp_path_factory, "w8a8", "ort")
    lint = lint_model(path, polygraphy=False)
    assert not lint.passed
    assert any("--target trt" in (f.fix or "") or "trt" in (f.fix or "") for f in lint.errors)
