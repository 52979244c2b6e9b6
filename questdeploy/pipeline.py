"""``questdeploy run``: the whole stage graph in order, each stage skipped when up to date."""

from __future__ import annotations

from typing import Iterator

from .quest.finetune import FinetuneConfig, parse_bits
from .stages.base import StageContext, StageResult, run_stage


def run_all(ctx: StageContext, finetune: FinetuneConfig, target: str, calib_steps: int, calib_samples: int,
            eval_samples: int) -> Iterator[StageResult]:
    from .stages import calibrate, evaluate
    from .stages import finetune as finetune_stage

    yield run_stage(ctx, calibrate.STAGE, calibrate.CalibrateConfig(steps=calib_steps, num_samples=calib_samples,
                                                                    batch_size=calib_samples))
    yield run_stage(ctx, finetune_stage.STAGE, finetune)
    for res in _deploy_stages(ctx, target, calib_steps, parse_bits(finetune.bits)[0]):
        yield res
    yield run_stage(ctx, evaluate.STAGE_QUANT, evaluate.EvalConfig(num_samples=eval_samples, steps=calib_steps, quantized=True))


def _deploy_stages(ctx: StageContext, target: str, steps: int, weight_bits: int) -> Iterator[StageResult]:
    """export -> verify (a tolerance breach stops the run) -> build-engine (trt target only)."""
    from .stages import build_engine, export, verify

    yield run_stage(ctx, export.STAGE, export.ExportConfig(target=target))
    res = run_stage(ctx, verify.STAGE, verify.VerifyConfig(steps=steps))
    yield res
    verify.raise_if_failed(res.summary)
    if target != "trt":
        ctx.log("build-engine: skipped: TensorRT engines are built from `--target trt` exports.")
        return
    res = run_stage(ctx, build_engine.STAGE, build_engine.BuildEngineConfig(profile="int4" if weight_bits == 4 else "int8"))
    yield res
    if not res.summary.get("engine_built"):
        ctx.log(f"build-engine: lint passed, engine not built: {res.summary.get('not_built_reason')}")
