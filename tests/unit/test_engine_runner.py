"""Engine runner parts that need no GPU: golden-data loading (Polygraphy JSON) and per-timestep metrics."""

from __future__ import annotations

import numpy as np
import pytest

from questdeploy.engine import runner as R
from questdeploy.engine.errors import EngineError, TensorRTNotInstalledError


def test_metrics():
    a = np.array([1.0, 2.0, 3.0])
    assert R.compare_arrays(a, a) == (0.0, 0.0, pytest.approx(1.0))
    mx, rel, cos = R.compare_arrays(a, a + np.array([0.0, 0.0, 0.5]))
    assert mx == 0.5 and rel == pytest.approx(0.5 / np.linalg.norm(a)) and 0.99 < cos < 1.0
    assert R.compare_arrays(a, -a)[2] == pytest.approx(-1.0)
    with pytest.raises(EngineError, match="shapes differ"):
        R.compare_arrays(a, np.ones(4))


def test_golden_files_in_polygraphy_format(tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    feeds = [{"sample": np.full((1, 2), t, np.float32), "timestep": np.array([t], np.float32)} for t in (999.0, 500.0, 1.0)]
    save_json(feeds, str(tmp_path / "inputs.json"))
    results = RunResults()
    results.append(("onnxrt-runner", [IterationResult({"out_sample": f["sample"] * 2}, runner_name="onnxrt-runner") for f in feeds]))
    results.save(str(tmp_path / "outputs.json"))

    got_in = R.load_golden_inputs(tmp_path / "inputs.json")
    ref = R.load_golden_outputs(tmp_path / "outputs.json")
    assert len(got_in) == 3 and np.array_equal(got_in[2]["timestep"], [1.0])
    engine_out = [{"out_sample": r["out_sample"] + (0.1 if i == 2 else 0.0)} for i, r in enumerate(ref)]
    comp = R.compare_outputs(ref, engine_out, got_in)
    w = comp.worst()
    assert [s.timestep for s in comp.steps] == [999.0, 500.0, 1.0]
    assert w["worst_step"] == 2 and w["max_abs"] == pytest.approx(0.1, rel=1e-6) and w["rel_l2"] > 0
    with pytest.raises(EngineError, match="no runner"):
        R.load_golden_outputs(tmp_path / "outputs.json", runner="trt-runner")


def test_run_plan_without_tensorrt_is_a_typed_error(tmp_path, monkeypatch):
    import builtins
    import sys

    real = builtins.__import__
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n)) if n == "tensorrt" else real(n, *a, **k))
    with pytest.raises(TensorRTNotInstalledError):
        R.run_plan(tmp_path / "model.plan", [])
