"""The benchmark's seed summary: the README's spread figures come from it, so its arithmetic is tested."""

from __future__ import annotations

import statistics

import pytest
from _scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_quest")


def _row(method, seed, fid, acc=0.9, psnr=25.0, secs=100.0):
    return {"bits": "w4a4", "method": method, "finetune_seed": seed, "fid_proxy": fid,
            "classifier_accuracy": acc, "psnr_vs_fp_db": psnr, "finetune_s": secs}


def test_seed_summary_gives_mean_and_sample_spread_per_setting(bench):
    rows = [_row("quest", 0, 70.0), _row("full", 0, 80.0), _row("quest", 1, 76.0), _row("full", 1, 60.0),
            _row("quest", 2, 79.0), _row("ptq", 0, 200.0)]
    text = bench.seed_summary(rows, [0, 1, 2])
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| w4a4")}
    assert set(lines) == {"quest", "full", "ptq"}
    q_mean, q_sd = statistics.fmean([70, 76, 79]), statistics.stdev([70, 76, 79])
    assert f"{q_mean:.2f} ± {q_sd:.2f}" in lines["quest"]
    assert "70.00 ± 14.14" in lines["full"]
    assert "200.00 (one run)" in lines["ptq"]  # ptq has no minibatches: it runs once, and says so


def test_seed_tag_marks_only_extra_seeds(bench):
    assert bench.seed_tag({"finetune_seed": 0}, 0) == ""
    assert bench.seed_tag({"finetune_seed": 2}, 0) == " (seed 2)"
    assert bench.seed_tag({}, 0) == ""
