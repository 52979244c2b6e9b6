"""Checks that need a built TensorRT plan: ``verify --engine PLAN`` and ``eval --engine PLAN``.

Both are stages of their own (``verify-engine``, ``eval-engine``) so the verify / eval outputs they read
stay untouched; both need TensorRT and a CUDA GPU and say so clearly without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, VerificationError
from ..metrics import psnr
from ..runfolder import sha256_file
from .base import Stage, StageContext


@dataclass
class EngineCheckConfig:
    plan: str
    plan_sha256: str = ""
    max_rel_l2: float = 0.1
    num_samples: int = 500
    steps: int = 25

    def __post_init__(self):
        p = Path(self.plan)
        if not p.is_file():
            raise ConfigError(f"engine plan {p} does not exist.", hint="pass --engine the model.plan that build-engine wrote.")
        self.plan = str(p.resolve())
        self.plan_sha256 = self.plan_sha256 or sha256_file(p)


def execute_verify(ctx: StageContext, cfg: EngineCheckConfig, out: Path) -> dict:
    from ..engine.runner import verify_engine

    vdir = ctx.run.stage_dir("verify")
    res = verify_engine(cfg.plan, vdir / "golden_inputs.json", vdir / "golden_outputs.json", max_rel_l2=cfg.max_rel_l2)
    (out / "engine_verify.json").write_text(json.dumps(res, indent=2, default=float))
    return {"passed": res["passed"], "worst": res["worst"], "plan": cfg.plan}


def execute_eval(ctx: StageContext, cfg: EngineCheckConfig, out: Path) -> dict:
    import torch

    from ..engine.runner import TrtEngineEps
    from ..images import save_grid
    from ..sampling import unet_eps_fn
    from .evaluate import EvalConfig, _grid_order, _is_digit_model, digit_scores, generate

    ecfg = EvalConfig(num_samples=cfg.num_samples, steps=cfg.steps)
    fp, labels = generate(ctx, unet_eps_fn(ctx.model.unet), ecfg, "sampling (fp)")
    with TrtEngineEps(cfg.plan) as eps:
        eng, _ = generate(ctx, lambda x, t, c: torch.as_tensor(eps(x, t, c)), ecfg, "sampling (engine)")
    p = psnr(eng, fp)
    metrics = {"engine": {"psnr_vs_fp_db": round(p.mean().item(), 3)}, "plan": cfg.plan}
    if _is_digit_model(ctx):
        metrics["engine"].update(digit_scores(eng, labels))
    save_grid(_grid_order(eng, labels), out / "samples_engine.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def raise_if_failed(summary: dict) -> None:
    if summary.get("passed") is False:
        raise VerificationError(f"engine disagrees with onnxruntime beyond tolerance (worst {summary.get('worst')}).",
                                hint="see verify-engine/engine_verify.json; rebuild with the fp16 profile to separate precision from quantization.")


VERIFY_STAGE = Stage("verify-engine", ("verify",), execute_verify, "run a TensorRT plan on the golden inputs")
EVAL_STAGE = Stage("eval-engine", (), execute_eval, "sample with a TensorRT plan and score it")
