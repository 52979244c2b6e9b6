"""Quality and cost of fp / ptq / full / quest at W8A8, W4A8, W4A4 on one model (default: embedded digits).

Every finetune runs in its own process (fresh session, honest peak RSS), through the real CLI stages,
from one shared calibration; methods are interleaved per bit setting so machine-speed drift hits all
of them alike. Prints a Markdown table (the README's) and writes it with the raw figures as JSON.

    python benchmarks/bench_quest.py                      # ~30-40 min on a 2-core CPU
    python benchmarks/bench_quest.py --bits w4a8 --methods ptq,quest --eval-samples 200
    python benchmarks/bench_quest.py --extra-for "full=--lr-weights 1e-5"   # a per-method setting
    python benchmarks/bench_quest.py --device cuda --no-eval --methods quest,full   # GPU cost only
    python benchmarks/bench_quest.py --bits w4a4 --methods quest,full --finetune-seeds 0,1,2   # seed spread

With ``--device cuda`` the finetunes run on the GPU (calibration and evaluation stay on the CPU) and the
table gains the peak GPU memory; ``--no-eval`` skips sampling, leaving the quality columns empty.
With ``--finetune-seeds`` every finetune runs once per seed (the minibatch draws change; calibration,
PTQ start and evaluation noise stay those of ``--seed``), and a second table gives each setting's mean and
standard deviation: one finetune's FID-proxy moves by several points with its seed alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "questdeploy.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/bench-quest")
    ap.add_argument("--bits", default="w8a8,w4a8,w4a4")
    ap.add_argument("--methods", default="ptq,quest,full")
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the finetunes run: cpu, cuda, cuda:N")
    ap.add_argument("--no-eval", action="store_true", help="cost only: no sampling, no quality figures")
    ap.add_argument("--finetune-seeds", default=None, metavar="S,S,...",
                    help="finetune each setting once per seed (default: --seed only) and summarise mean and spread")
    ap.add_argument("--extra", default="", help="extra finetune options, e.g. '--groups 20'")
    ap.add_argument("--extra-for", action="append", default=[], metavar="METHOD=OPTIONS",
                    help="finetune options for one method only, e.g. 'full=--lr-weights 1e-5' (repeatable)")
    a = ap.parse_args()
    per_method = {}
    for item in a.extra_for:
        method, sep, opts = item.partition("=")
        if not sep:
            sys.exit(f"--extra-for needs METHOD=OPTIONS, got {item!r}")
        per_method[method.strip()] = opts.split()
    try:
        seeds = [a.seed] if a.finetune_seeds is None else [int(x) for x in a.finetune_seeds.split(",")]
    except ValueError:
        sys.exit(f"--finetune-seeds needs integers separated by commas, got {a.finetune_seeds!r}")
    out = Path(a.out)
    model = ["--model", a.model] if a.model else []
    base = out / "base"
    cli("calibrate", "--run-dir", str(base), "--seed", str(a.seed), "--quiet", *model)
    fp = {}
    if not a.no_eval:
        cli("eval", "--run-dir", str(base), "--seed", str(a.seed), "--num-samples", str(a.eval_samples), "--quiet", *model)
        fp = json.loads((base / "eval" / "metrics.json").read_text()).get("fp", {})
    rows = [{"method": "fp", "bits": "w32a32", **fp, "psnr_vs_fp_db": float("inf")}]
    for bits in a.bits.split(","):
        for seed in seeds:  # seeds outside methods: machine-speed drift hits every method alike
            for method in a.methods.split(","):
                if method == "ptq" and seed != seeds[0]:
                    continue  # no training, no minibatches: the seed changes nothing
                rows.append(run_one(a, out, base, bits, method, seed, model, per_method.get(method, [])))
                (out / "results.json").write_text(json.dumps(rows, indent=2))  # a killed run keeps what it measured
    gpu = a.device != "cpu"
    head = ("| bits | method | FID-proxy ↓ | accuracy ↑ | PSNR vs FP (dB) ↑ | finetune time (s) | of which training (s) "
            "| peak RSS (MiB) |" + (" peak GPU (MiB) |" if gpu else "") + " trained params |")
    lines = [head, "|" + "---|" * (10 if gpu else 9)]
    for r in rows:
        if a.no_eval and r["method"] == "fp":
            continue
        lines.append(
            f"| {r['bits']} | {r['method']}{seed_tag(r, a.seed)} | {r.get('fid_proxy', float('nan')):.3f} | {r.get('classifier_accuracy', float('nan')):.3f} | "
            f"{r.get('psnr_vs_fp_db', float('nan')):.2f} | {r.get('finetune_s', 0):.1f} | {r.get('train_s', 0):.1f} | {r.get('peak_rss_mib', 0):.0f} | "
            + (f"{r.get('peak_gpu_mib') or 0:.0f} | " if gpu else "") + f"{r.get('trainable_params', 0)} |")
    if len(seeds) > 1:
        lines += ["", seed_summary(rows[1:], seeds)]
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


def run_one(a, out: Path, base: Path, bits: str, method: str, seed: int, model: list[str], extra: list[str]) -> dict:
    """One finetune (finetune seed ``seed``) in a fresh process on a copy of ``base``, then its evaluation."""
    run = out / (f"{bits}-{method}" if seed == a.seed else f"{bits}-{method}-s{seed}")
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(base, run, ignore=shutil.ignore_patterns(".lock", "eval"))
    t0 = time.time()
    cli("finetune", "--run-dir", str(run), "--bits", bits, "--method", method, "--seed", str(seed), "--quiet",
        "--device", a.device, *model, *a.extra.split(), *extra)
    wall = time.time() - t0
    q = {}
    if not a.no_eval:
        cli("eval", "--quantized", "--run-dir", str(run), "--seed", str(a.seed), "--num-samples",
            str(a.eval_samples), "--quiet", *model)
        q = json.loads((run / "eval-quantized" / "metrics.json").read_text())["quantized"]
    rep = json.loads((run / "finetune" / "report.json").read_text())
    print(f"  {bits} {method} seed {seed}: {q} in {rep['total_seconds']} s", file=sys.stderr)
    return {"method": method, "bits": bits, "finetune_seed": seed, **q, "finetune_s": rep["total_seconds"],
            "train_s": rep.get("seconds", 0.0), "process_s": round(wall, 1),
            "peak_rss_mib": rep["peak_rss_mib"], "peak_gpu_mib": rep.get("peak_gpu_mib"),
            "trainable_params": rep["trainable_params"], "total_params": rep["total_params"]}


def seed_tag(row: dict, default_seed: int) -> str:
    seed = row.get("finetune_seed", default_seed)
    return "" if seed == default_seed else f" (seed {seed})"


def seed_summary(rows: list[dict], seeds: list[int]) -> str:
    """Mean ± sample standard deviation over the finetune seeds, per (bits, method)."""
    keys = [("fid_proxy", "FID-proxy ↓", 2), ("classifier_accuracy", "accuracy ↑", 3),
            ("psnr_vs_fp_db", "PSNR vs FP (dB) ↑", 2), ("finetune_s", "finetune time (s)", 1)]
    lines = [f"Over finetune seeds {', '.join(map(str, seeds))} (mean ± standard deviation):", "",
             "| bits | method | " + " | ".join(k[1] for k in keys) + " |", "|" + "---|" * (2 + len(keys))]
    settings = dict.fromkeys((r["bits"], r["method"]) for r in rows)
    for bits, method in settings:
        group = [r for r in rows if (r["bits"], r["method"]) == (bits, method)]
        cells = []
        for key, _, digits in keys:
            vals = [r[key] for r in group if key in r]
            if not vals:
                cells.append("–")
                continue
            mean = statistics.fmean(vals)
            cells.append(f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1
                         else f"{mean:.{digits}f} (one run)")
        lines.append(f"| {bits} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
