"""build-engine stage: TensorRT lint (always, no GPU needed), then the engine build where TensorRT exists.

On a machine without TensorRT or a GPU the stage still records the lint report and the equivalent
``trtexec`` / ``polygraphy convert`` command lines, and the command then fails saying what is missing;
``--check-only`` stops after the lint on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QuestDeployError
from .base import Stage, StageContext
from .export import ONNX_NAME


@dataclass
class BuildEngineConfig:
    profile: str = "int8"
    check_only: bool = False
    batch: str | None = None
    dims: tuple[str, ...] = ()
    optimization_level: int | None = None
    workspace_mib: int | None = None
    timing_cache: str | None = None
    refit: str | None = None
    strip_weights: bool | None = None
    triton_repo: str | None = None
    triton_model: str = "quest_unet"
    polygraphy_lint: bool = True
    disable_rules: tuple[str, ...] = field(default_factory=tuple)


def default_dims(ctx: StageContext) -> tuple[str, ...]:
    """The conditioning sequence length this model really uses, instead of the profile's SD guess."""
    emb = getattr(ctx.model.conditioner, "embeddings", None)
    if emb is None:
        return ()
    t = int(emb.shape[1])
    return (f"sequence={t}:{t}:{t}",)


def execute(ctx: StageContext, cfg: BuildEngineConfig, out: Path) -> dict:
    from ..engine.errors import NoCudaDeviceError, TensorRTNotInstalledError
    from ..engine.stage import build_engine_stage

    onnx_path = ctx.run.stage_dir("export") / ONNX_NAME
    kwargs = dict(profile=cfg.profile, check_only=cfg.check_only, batch=cfg.batch,
                  dims=list(cfg.dims) or list(default_dims(ctx)), optimization_level=cfg.optimization_level,
                  workspace_mib=cfg.workspace_mib, timing_cache=cfg.timing_cache, refit=cfg.refit,
                  strip_weights=cfg.strip_weights, triton_repo=cfg.triton_repo, triton_model=cfg.triton_model,
                  disable_rules=cfg.disable_rules, polygraphy_lint=cfg.polygraphy_lint, progress=ctx.progress, log=ctx.log)
    try:
        full = build_engine_stage(onnx_path, out, **kwargs)
        summary = {"engine_built": not cfg.check_only, "plan": "model.plan" if not cfg.check_only else None,
                   "triton": full.get("triton"), "trtexec": full["commands"]["trtexec"]}
    except (TensorRTNotInstalledError, NoCudaDeviceError) as e:
        # the lint and the command lines are on disk: keep them, say what is missing afterwards, and
        # build again next time rather than skipping (``incomplete``)
        summary = {"engine_built": False, "not_built_reason": e.one_line(), "incomplete": True}
    _retarget_paths(out, ctx.run.stage_dir("build-engine"))
    summary = json.loads(json.dumps(summary, default=str).replace(str(out), str(ctx.run.stage_dir("build-engine"))))
    lint = _read_lint(out)
    summary.update(form=lint.get("form"), lint_passed=lint.get("passed"), lint_errors=lint.get("counts", {}).get("error"),
                   lint_warnings=lint.get("counts", {}).get("warning"), check_only=cfg.check_only)
    return summary


def _retarget_paths(tmp: Path, final: Path) -> None:
    """Files written in the temp folder name their final location (the folder is renamed on success)."""
    for p in tmp.iterdir():
        if p.is_file() and p.suffix in (".sh", ".txt", ".json"):
            text = p.read_text()
            if str(tmp) in text:
                p.write_text(text.replace(str(tmp), str(final)))


def _read_lint(out: Path) -> dict:
    p = out / "lint.json"
    return json.loads(p.read_text()) if p.is_file() else {}


class EngineNotBuiltError(QuestDeployError):
    """TensorRT or a CUDA device is missing; the lint report is kept in the run folder."""

    exit_code = 3


class LintFailed(QuestDeployError):
    """--check-only found TensorRT rule errors."""


def raise_if_failed(summary: dict, check_only: bool) -> None:
    if check_only and summary.get("lint_passed") is False:
        raise LintFailed(f"TensorRT lint failed with {summary.get('lint_errors', '?')} error(s); see build-engine/lint.txt.",
                         hint="each finding names the node and the fix (often: export with --target trt).")
    if not check_only and not summary.get("engine_built"):
        raise EngineNotBuiltError(summary.get("not_built_reason", "engine not built."),
                                  hint=None if "Hint:" in summary.get("not_built_reason", "") else
                                  "the lint report and build_commands.sh are in build-engine/.")


STAGE = Stage("build-engine", ("export",), execute, "lint for TensorRT and build the engine")
