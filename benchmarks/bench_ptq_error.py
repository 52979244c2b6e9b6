"""PTQ noise-prediction error of the default model under one setting swept over values: a fast proxy (about
a minute per row, no sampling) for choices that come before finetuning.

    python benchmarks/bench_ptq_error.py --run-dir runs/bench-quest/base --bits w4a4 --smooth-alpha 0,0.3,0.5,0.7
    python benchmarks/bench_ptq_error.py --run-dir runs/base --bits w4a4 --smooth-alpha 0.85 --no-channel-shift

The error is the relative MSE of the PTQ model's noise prediction against the FP teacher's, on the last 32
calibration samples of every recorded step (the initialisation uses the first 16-64).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from questdeploy.models import load_model  # noqa: E402
from questdeploy.quest.finetune import FinetuneConfig, initialise  # noqa: E402
from questdeploy.stages.calibrate import CalibrationData  # noqa: E402


@torch.no_grad()
def relative_error(qunet, calib, held_out: int = 32) -> float:
    num = den = 0.0
    for i, t in enumerate(calib.timesteps):
        x, eps = calib.step(i)
        x, eps = x[-held_out:], eps[-held_out:]
        cond = None if calib.cond is None else calib.cond[-held_out:]
        out = qunet(x, torch.full((x.shape[0],), t, dtype=torch.long), cond)
        num += float(((out - eps) ** 2).sum())
        den += float((eps ** 2).sum())
    return num / den


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--smooth-alpha", default="0,0.7", help="comma-separated values to sweep")
    ap.add_argument("--no-channel-shift", action="store_true", help="turn the 4-bit channel shifts off (default: on at A4)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(None)
    calib = CalibrationData(a.run_dir / "calibrate")
    print(f"| {a.bits} ptq, --smooth-alpha | relative MSE of the noise prediction | init (s) |")
    print("|---|---|---|")
    for alpha in (float(v) for v in a.smooth_alpha.split(",")):
        t0 = time.time()
        q = initialise(model.unet, calib, FinetuneConfig(method="ptq", bits=a.bits, smooth_alpha=alpha,
                                                     channel_shift=False if a.no_channel_shift else None),
                       model.num_train_timesteps)
        print(f"| {alpha:g} | {relative_error(q, calib):.5f} | {time.time() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
