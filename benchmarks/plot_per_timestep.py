"""Where in the sampling do quantized checkpoints differ? Overlays the per-timestep noise-prediction error
that `questdeploy eval --quantized` records (``eval-quantized/metrics.json``, key ``per_timestep``) for
several run folders in one PNG, and prints it as a Markdown table.

    python benchmarks/plot_per_timestep.py runs/a runs/b --labels quest,full --out per_timestep.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from questdeploy.export.verify import plot_per_timestep  # noqa: E402


def load_rows(run: Path) -> list[dict]:
    path = run / "eval-quantized" / "metrics.json"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing. Fix: run `questdeploy eval --quantized --run-dir {run}` first.")
    metrics = json.loads(path.read_text())
    if "per_timestep" not in metrics:
        raise SystemExit(f"error: {path} has no per-timestep error (an older eval). "
                         f"Fix: re-run `questdeploy eval --quantized --run-dir {run} --force`.")
    return metrics["per_timestep"]["rows"]


def table(series: dict[str, list[dict]]) -> str:
    """Relative L2 per timestep, one column per run (rows in sampling order)."""
    names = list(series)
    lines = ["| timestep | " + " | ".join(f"{n} rel. L2" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i, row in enumerate(series[names[0]]):
        vals = [series[n][i]["rel_l2"] if i < len(series[n]) else float("nan") for n in names]
        lines.append(f"| {row['timestep']:g} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", default=None, help="comma-separated names, one per run (default: folder names)")
    ap.add_argument("--out", type=Path, default=Path("per_timestep.png"))
    a = ap.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [r.name for r in a.runs]
    if len(labels) != len(a.runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(a.runs)} runs. Fix: give one label per run.")
    series = {lab: load_rows(run) for lab, run in zip(labels, a.runs)}
    plot_per_timestep(series, a.out, title="noise-prediction error vs FP, on FP's trajectory")
    print(table(series))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
