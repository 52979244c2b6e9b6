"""The per-timestep overlay script: it reads what `eval --quantized` writes and says how to fix a missing eval."""

from __future__ import annotations

import json

import pytest
from _scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("plot_per_timestep")


def _run(tmp_path, name, errors):
    run = tmp_path / name
    (run / "eval-quantized").mkdir(parents=True)
    rows = [{"timestep": t, "rel_l2": e, "cosine": 1 - e, "max_abs": e, "finite": True}
            for t, e in zip((900, 500, 100), errors)]
    (run / "eval-quantized" / "metrics.json").write_text(json.dumps({"per_timestep": {"rows": rows}}))
    return run


def test_overlay_table_has_one_column_per_run_in_sampling_order(script, tmp_path, capsys):
    a, b = _run(tmp_path, "a", (0.01, 0.02, 0.3)), _run(tmp_path, "b", (0.011, 0.019, 0.25))
    out = tmp_path / "pt.png"
    assert script.main([str(a), str(b), "--labels", "quest,full", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| timestep | quest rel. L2 | full rel. L2 |" in text
    assert "| 900 | 0.0100 | 0.0110 |" in text and "| 100 | 0.3000 | 0.2500 |" in text
    assert text.index("| 900 ") < text.index("| 100 ")
    assert out.stat().st_size > 1000


def test_a_run_without_a_quantized_eval_names_the_command(script, tmp_path):
    with pytest.raises(SystemExit, match="questdeploy eval --quantized"):
        script.main([str(tmp_path / "nothing")])
    old = tmp_path / "old"
    (old / "eval-quantized").mkdir(parents=True)
    (old / "eval-quantized" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="--force"):
        script.main([str(old)])
    with pytest.raises(SystemExit, match="one label per run"):
        script.main([str(old), "--labels", "a,b"])
