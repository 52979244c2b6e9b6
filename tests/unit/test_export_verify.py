"""Verify library: metrics, per-timestep / trajectory / reference comparisons, tolerances, plot, Polygraphy I/O."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from questdeploy.export import export_onnx, trace
from questdeploy.export.testing import cached, calibrate_random, tiny_uncond_unet
from questdeploy.export.verify import (
    Tolerances, check_tolerances, compare_arrays, json_ready, load_polygraphy_io, per_layer_compare,
    per_timestep_errors, plot_per_timestep, psnr, save_polygraphy_io, summarize_steps, trajectory_feeds,
    verify_report,
)
from questdeploy.quant import QuantConfig, quantize_unet
from questdeploy.runners import OnnxRuntimeRunner, ReferenceRunner, TorchRunner

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False}


def test_metrics():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    m = compare_arrays(a, a)
    assert m == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": pytest.approx(1.0), "finite": True}
    m = compare_arrays(a, a * 1.01)
    assert m["rel_l2"] == pytest.approx(0.01, rel=1e-4) and m["cosine"] == pytest.approx(1.0)
    assert not compare_arrays(a, np.array([1, np.nan, 3], np.float32))["finite"]
    assert psnr(a, a) == math.inf
    assert psnr(np.zeros(4), np.full(4, 0.02)) == pytest.approx(10 * math.log10(4 / 0.0004))
    with pytest.raises(ValueError, match="shape"):
        compare_arrays(a, a[:2])


def test_tolerance_check():
    ok = {"per_timestep": {"summary": {"rel_l2_max": 0.02, "rel_l2_mean": 0.005, "rel_l2_max_timestep": 1.0, "cosine_min": 0.9999, "all_finite": True}},
          "reference": {"out_sample": {"rel_l2": 1e-3}}, "trajectory": {"psnr_db": 40.0}, "exactness": {"mismatches": 0}}
    assert check_tolerances(ok) == (True, [])
    bad = json.loads(json.dumps(ok))
    bad["per_timestep"]["summary"].update(rel_l2_max=0.2, all_finite=False)
    bad["trajectory"]["psnr_db"] = 20.0
    bad["exactness"] = {"mismatches": 7, "worst": {"name": "conv_in.input_quantizer", "mismatches": 7}}
    passed, reasons = check_tolerances(bad)
    assert not passed and len(reasons) == 4 and any("t=1" in r for r in reasons)
    assert any("conv_in.input_quantizer" in r for r in reasons)
    loose = Tolerances(call_rel_l2=0.5, trajectory_psnr_db=10, quantizer_mismatches=None)
    assert check_tolerances(bad, loose)[1] == ["non-finite values in the exported model's output"]
    assert Tolerances.optimized().call_rel_l2 > Tolerances.exact().call_rel_l2
    assert Tolerances.optimized().quantizer_mismatches is None
    a4, a8 = Tolerances.exact(act_bits=4), Tolerances.exact(act_bits=8)
    assert a8 == Tolerances() and a4.call_rel_l2 == 2 * a8.call_rel_l2 and a4.call_cosine < a8.call_cosine
    assert a4.call_rel_l2_mean == a8.call_rel_l2_mean and a4.quantizer_mismatches == 0  # exactness stays strict
    flip = json.loads(json.dumps(ok))
    flip["per_timestep"]["summary"].update(rel_l2_max=0.056)
    assert not check_tolerances(flip, a8)[0] and check_tolerances(flip, a4)[0]
    assert summarize_steps([]) == {}


def _fp_export(tmp_path_factory):
    def build():
        unet = tiny_uncond_unet()
        res = export_onnx(unet, tmp_path_factory.mktemp("verify") / "fp.onnx", target="fp")
        return unet, res.path
    return cached(("verify-fp",), build)


@pytest.mark.slow
def test_verify_report_fp_export_passes_exact_tolerances(tmp_path_factory, tmp_path):
    unet, path = _fp_export(tmp_path_factory)
    ref, test = TorchRunner(unet), OnnxRuntimeRunner(path)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    report = verify_report(ref, test, SCHED, noise, None, steps=4, reference=ReferenceRunner(path))
    assert report["passed"], report["failures"]
    rows = report["per_timestep"]["rows"]
    assert [r["timestep"] for r in rows] == sorted((r["timestep"] for r in rows), reverse=True) and len(rows) == 4
    assert report["per_timestep"]["summary"]["rel_l2_max"] < 1e-5
    assert report["trajectory"]["psnr_db"] > 80 and report["reference"]["out_sample"]["rel_l2"] < 1e-5
    json.dumps(json_ready(report))  # what the stage writes as verify.json
    png = plot_per_timestep({"onnxrt": rows}, tmp_path / "err.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # golden data in Polygraphy's formats, readable back and by `polygraphy run`
    feeds = report["_feeds"][:2]
    outs = [ref.infer(f) for f in feeds]
    ip, op = save_polygraphy_io(feeds, {"torch": outs}, tmp_path / "inputs.json", tmp_path / "outputs.json")
    f2, r2 = load_polygraphy_io(ip, op)
    np.testing.assert_array_equal(f2[1]["sample"], feeds[1]["sample"])
    np.testing.assert_array_equal(r2["torch"][0]["out_sample"], outs[0]["out_sample"])
    exe = shutil.which("polygraphy")
    if exe is None:
        pytest.skip("polygraphy CLI not on PATH")
    proc = subprocess.run([exe, "run", str(path), "--onnxrt", "--load-inputs", str(ip), "--load-outputs", str(op),
                           "--atol", "1e-4", "--rtol", "1e-4"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_per_timestep_and_per_layer_on_quantized_export(tmp_path):
    unet = tiny_uncond_unet()
    q = quantize_unet(unet, QuantConfig(num_groups=4))
    calibrate_random(q)
    res = export_onnx(q, tmp_path / "q.onnx", target="ort", marked=cached(("verify-marked",), lambda: trace(q)))
    ref, test = TorchRunner(q), OnnxRuntimeRunner(res.path)
    feeds = trajectory_feeds(ref, SCHED, torch.randn(1, 1, 8, 8), None, steps=3)
    rows = per_timestep_errors(ref, test, feeds)
    assert len(rows) == 3 and all(r["finite"] and r["cosine"] > 0.9 for r in rows)
    report = verify_report(ref, test, SCHED, torch.randn(1, 1, 8, 8), None, steps=2, trajectory=False,
                           onnx_path=res.path, qunet=q)
    assert report["exactness"]["mismatches"] == 0 and report["exactness"]["quantizers"] == res.report.activation_quantizers
    layers = per_layer_compare(res.path, q, feeds[0])
    assert len(layers) == res.report.activation_quantizers
    assert all(r["lsb_max"] < 1e6 for r in layers)
    first = next((r for r in layers if r["lsb_mismatch_frac"] > 0), None)
    assert first is None or first["lsb_max"] <= 1.0 + 1e-3
