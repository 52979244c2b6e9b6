"""What a stage is: a declaration (name, inputs, config type) plus a function that fills a temp folder.

The run folder holds the state; stages hold none. ``run_stage`` skips a stage whose outputs are up to
date with its config and inputs, and otherwise runs it into a temp folder that replaces the old
outputs only when complete.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import StageNotReadyError
from ..models import LoadedModel
from ..runfolder import RunFolder, sha256_json


@dataclass
class StageContext:
    run: RunFolder
    model: LoadedModel
    seed: int = 0
    progress: bool = True
    force: bool = False
    log: Callable[[str], None] = print
    fingerprint: str = ""  # of the stage now running: keys its resume state
    on_success: list = field(default_factory=list)  # run after the stage's outputs are committed


@dataclass
class StageResult:
    name: str
    skipped: bool
    summary: dict = field(default_factory=dict)
    outputs: Path | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    execute: Callable[[StageContext, Any, Path], dict]
    describe: str = ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def fingerprint(ctx: StageContext, stage: Stage, config: Any) -> str:
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return sha256_json({
        "stage": stage.name,
        "config": cfg,
        "seed": ctx.seed,
        "model": ctx.model.model_id,
        "inputs": {dep: ctx.run.output_digest(dep) for dep in stage.inputs},
    })


def run_stage(ctx: StageContext, stage: Stage, config: Any) -> StageResult:
    for dep in stage.inputs:
        changed = ctx.run.modified_outputs(dep) if ctx.run.stage_record(dep) else []
        if changed:
            raise StageNotReadyError(
                f"outputs of '{dep}' changed after it ran ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); "
                f"stage '{stage.name}' will not read them.",
                hint=f"restore them, or re-run `questdeploy {dep} --force --run-dir {ctx.run.path}`.",
            )
        if not ctx.run.is_done(dep):
            raise StageNotReadyError(
                f"stage '{stage.name}' needs the outputs of '{dep}', which has not finished in {ctx.run.path}.",
                hint=f"run `questdeploy {dep} --run-dir {ctx.run.path}` first, or `questdeploy run` for the whole graph.",
            )
    fp = fingerprint(ctx, stage, config)
    rec = ctx.run.stage_record(stage.name) or {}
    incomplete = rec.get("summary", {}).get("incomplete", False)  # e.g. an engine a CPU machine could not build
    if not ctx.force and not incomplete and ctx.run.is_done(stage.name, fp):
        return StageResult(stage.name, True, rec.get("summary", {}), ctx.run.stage_dir(stage.name))
    seed_everything(ctx.seed)
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    record = {"config": cfg, "fingerprint": fp, "seed": ctx.seed,
              "inputs": {dep: ctx.run.output_digest(dep) for dep in stage.inputs}}
    started = time.time()
    ctx.fingerprint, ctx.on_success = fp, []
    with ctx.run.stage_output(stage.name, record) as tmp:
        summary = stage.execute(ctx, config, tmp)
        record["summary"] = summary
        record["wall_seconds"] = round(time.time() - started, 3)
    for fn in ctx.on_success:
        fn()
    return StageResult(stage.name, False, summary, ctx.run.stage_dir(stage.name))
