"""Cost of one finetuning iteration (FP teacher forward when there is a local loss, quantized forward, backward,
Adam step) per method and batch size, on a device: separates per-iteration overhead (Python, kernel launches)
from arithmetic.

    python benchmarks/bench_iteration.py --run-dir runs/default                  # needs a calibrated run
    python benchmarks/bench_iteration.py --run-dir runs/default --device cuda --batch 1,16,64

PTQ initialisation uses plain rounding and no 8-bit weights (what it picks does not change the cost of an
iteration). Contenders are interleaved round by round; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from questdeploy.models import load_model  # noqa: E402
from questdeploy.quant.quantizers import ActQuantizer  # noqa: E402
from questdeploy.quest import finetune as F  # noqa: E402
from questdeploy.stages.calibrate import CalibrationData  # noqa: E402


def trainable(qunet, cfg, method: str) -> tuple[list, list[str]]:
    """The parameters one CMA iteration of ``method`` trains, and its local-supervision taps."""
    layers = qunet.quant_layers()
    tla, cma = cfg.policy.select(layers)
    names = list(layers) if method == "full" else cma
    weights = [p for n in names for p in (layers[n].weight, layers[n].bias) if p is not None]
    scales = [q.scales for q in qunet.quantizers().values() if isinstance(q, ActQuantizer)]
    return weights + scales, (tla + cma if method == "full" else cma)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--methods", default="quest,full")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--iters", type=int, default=5, help="iterations per contender per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = F.check_device(a.device)
    model = load_model(None)
    calib = CalibrationData(a.run_dir / "calibrate")
    if device.type != "cpu":
        calib = F.CalibOnDevice(calib, device)
    fp = model.unet.to(device).eval().requires_grad_(False)
    cfg = F.FinetuneConfig(bits=a.bits, weight_rounding="nearest", w8_budget=0.0, calib_samples_per_step=8,
                           device=a.device)
    contenders = {}
    frozen = contextlib.ExitStack()
    for method in a.methods.split(","):
        q = F.initialise(fp, calib, cfg, model.num_train_timesteps)
        q.requires_grad_(False)
        params, taps = trainable(q, cfg, method)
        for p in params:
            p.requires_grad_(True)
        frozen.enter_context(F._freeze_untrained(q.quant_layers(), {id(p): p for p in params}))  # as finetune does
        q.train()
        q.set_timestep_group(0)
        opt = torch.optim.Adam(params, lr=1e-6)
        for bs in (int(b) for b in a.batch.split(",")):
            batch = F._Batches(calib, bs, 0).draw([0])
            contenders[(method, bs)] = (q, opt, taps, batch)

    def step(q, opt, taps, batch):
        loss, _, _ = F._loss(q, fp, batch, taps, cfg.w_local, cfg.w_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict = {k: [] for k in contenders}
    for k, c in contenders.items():  # warm-up
        step(*c)
    for r in range(a.rounds):
        keys = list(contenders)
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                step(*contenders[k])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append((time.perf_counter() - t0) / a.iters * 1e3)
    print(f"device {device}, {a.bits}, threads {torch.get_num_threads()}, median of {a.rounds} rounds x {a.iters} iterations")
    print("| method | batch | ms / iteration |")
    print("|---|---|---|")
    for (method, bs), ts in times.items():
        print(f"| {method} | {bs} | {statistics.median(ts):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
