"""Finetune stage: PTQ initialisation + the chosen method (quest / full / ptq) -> a checkpoint.

Output ``finetune/checkpoint/`` (``quant_spec.json`` + ``model.safetensors``) and ``report.json`` with the
trained layers, parameter counts, losses, wall time, peak RSS (and peak GPU memory with ``--device cuda``);
export consumes the checkpoint as is. The checkpoint is saved from the CPU whatever device trained it.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path

import torch

from ..quest.finetune import CalibOnDevice, FinetuneConfig, check_device, finetune, initialise, weight_bits_summary
from .base import Stage, StageContext
from .calibrate import CalibrationData


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def execute(ctx: StageContext, cfg: FinetuneConfig, out: Path) -> dict:
    from ..quant.spec import save_checkpoint

    device = check_device(cfg.device)
    calib = CalibrationData(ctx.run.stage_dir("calibrate"))
    fp_unet = ctx.model.unet
    if device.type != "cpu":
        calib = CalibOnDevice(calib, device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    try:
        fp_unet.to(device)
        qunet = initialise(fp_unet, calib, cfg, ctx.model.num_train_timesteps, progress=ctx.progress)
        init_s = time.time() - started
        resume = ctx.run.path / ".resume" / f"finetune-{ctx.fingerprint[:16]}.pt"
        report = finetune(qunet, fp_unet, calib, cfg, seed=ctx.seed, progress=ctx.progress, log=ctx.log,
                          resume=resume, checkpoint_every=cfg.checkpoint_every)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            report["gpu"] = torch.cuda.get_device_name(device)
    finally:
        fp_unet.to("cpu")  # later stages (export, eval) take the model from the CPU
    qunet.to("cpu")
    report.update(weight_bits_summary(qunet))
    report.update({"init_seconds": round(init_s, 2), "total_seconds": round(time.time() - started, 2),
                   "peak_rss_mib": round(peak_rss_mib(), 1), "device": str(device)})
    meta = {"method": cfg.method, "bits": cfg.bits, "model_id": ctx.model.model_id, "seed": ctx.seed,
            "finetune_config": dataclasses.asdict(cfg), "calibration_timesteps": calib.timesteps}
    save_checkpoint(qunet, out / "checkpoint", extra_meta=meta)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    ctx.on_success.append(lambda: resume.unlink(missing_ok=True))
    return {"method": cfg.method, "bits": cfg.bits, "trainable_params": report["trainable_params"],
            "total_params": report["total_params"], "weight_8bit_fraction": report["weight_8bit_fraction"],
            "finetune_seconds": report.get("seconds"),
            "total_seconds": report["total_seconds"], "peak_rss_mib": report["peak_rss_mib"],
            **({"peak_gpu_mib": report["peak_gpu_mib"]} if "peak_gpu_mib" in report else {})}


STAGE = Stage("finetune", ("calibrate",), execute, "quantize and selectively finetune (QuEST) into a checkpoint")
