"""``questdeploy run``: the whole stage graph in order, each stage skipped when up to date."""

from __future__ import annotations

from typing import Iterator

from .quest.finetune import FinetuneConfig
from .stages.base import StageContext, StageResult, run_stage


def run_all(ctx: StageContext, finetune: FinetuneConfig, target: str, calib_steps: int, calib_samples: int,
            eval_samples: int) -> Iterator[StageResult]:
    from .stages import calibrate, evaluate
    from .stages import finetune as finetune_stage

    yield run_stage(ctx, calibrate.STAGE, calibrate.CalibrateConfig(steps=calib_steps, num_samples=calib_samples,
                                                                    batch_size=calib_samples))
    yield run_stage(ctx, finetune_stage.STAGE, finetune)
    for res in _deploy_stages(ctx, target, calib_steps):
        yield res
    yield run_stage(ctx, evaluate.STAGE_QUANT, evaluate.EvalConfig(num_samples=eval_samples, steps=calib_steps, quantized=True))


def _deploy_stages(ctx: StageContext, target: str, steps: int) -> Iterator[StageResult]:
    """export -> verify -> build-engine; filled in as those stages land."""
    return iter(())
