"""Calibration data, data-free: the FP model's own DDIM trajectory, recorded at every UNet call.

Stored per sampler step as ``steps/step_XXX.safetensors`` (``sample`` = the UNet input x_t at that step,
``eps`` = the FP noise prediction for it), plus ``cond.safetensors`` (conditioning, shared by all steps)
and ``calib.json``. Writing step by step keeps memory bounded by one step's batch.

The input recorded with timestep t_k is the x_t that the UNet saw *together with* t_k (the pairing is
done inside the UNet call hook, so the off-by-one of pairing x_{k+1} with t_k cannot happen).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..sampling import make_scheduler, unet_eps_fn
from .base import Stage, StageContext


@dataclass
class CalibrateConfig:
    steps: int = 25          # DDIM steps of the sampler the trajectory comes from
    num_samples: int = 128   # trajectories (= calibration samples per step)
    batch_size: int = 128

    def __post_init__(self):
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"--steps {self.steps} is out of range.", hint="use 1..1000 sampler steps (e.g. 25).")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ConfigError("--num-samples and --batch-size must be positive.", hint="e.g. --num-samples 128.")


def config_from(recipe: Path | None = None, **overrides) -> CalibrateConfig:
    """A recipe's ``[calibrate]`` table, then explicit values (None = not given) on top."""
    import tomllib

    values: dict = {}
    if recipe is not None:
        try:
            table = tomllib.loads(Path(recipe).read_text()).get("calibrate", {})
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {recipe} is not valid TOML ({e}).", hint="see calibration/default.toml for the format.") from None
        unknown = sorted(set(table) - {"steps", "num_samples", "batch_size"})
        if unknown:
            raise ConfigError(f"recipe {recipe} has unknown keys {unknown}.", hint="use steps, num_samples, batch_size.")
        values.update(table)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CalibrateConfig(**values)


def _labels(ctx: StageContext, n: int) -> torch.Tensor:
    k = max(ctx.model.conditioner.num_classes, 1)
    return torch.arange(n) % k


def execute(ctx: StageContext, cfg: CalibrateConfig, out: Path) -> dict:
    """Record the trajectory; finished steps go to a resume folder first, so a killed run continues there."""
    model = ctx.model
    labels = _labels(ctx, cfg.num_samples)
    cond = model.conditioner(labels)
    sched = make_scheduler(model.scheduler_config, cfg.steps)
    partial = ctx.run.path / ".resume" / f"calibrate-{ctx.fingerprint[:16]}"
    (partial / "steps").mkdir(parents=True, exist_ok=True)
    start = 0
    if (partial / "next.safetensors").is_file():
        state = load_file(str(partial / "next.safetensors"))
        start, x = int(state["step"]), state["x"]
        ctx.log(f"calibrate: resuming at step {start} of {cfg.steps}")
    else:
        g = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn((cfg.num_samples, *model.sample_shape), generator=g) * sched.init_noise_sigma
    eps_fn = unet_eps_fn(model.unet)
    timesteps = [int(t) for t in sched.timesteps]
    with torch.no_grad():
        for i in tqdm(range(start, len(timesteps)), desc="calibrate", disable=not ctx.progress,
                      initial=start, total=len(timesteps)):
            t = sched.timesteps[i]
            eps = torch.cat([
                eps_fn(x[s:s + cfg.batch_size], t.expand(min(cfg.batch_size, cfg.num_samples - s)),
                       None if cond is None else cond[s:s + cfg.batch_size])
                for s in range(0, cfg.num_samples, cfg.batch_size)
            ])
            if not (torch.isfinite(x).all() and torch.isfinite(eps).all()):
                raise DataError(
                    f"the FP model produced NaN/Inf at sampler step {i} (t={int(t)}).",
                    hint="check the model weights load correctly (NaN weights?) and the scheduler config.",
                )
            save_file({"sample": x.contiguous(), "eps": eps.contiguous()}, str(partial / "steps" / f"step_{i:03d}.safetensors"))
            x = sched.step(eps, t, x, eta=0.0).prev_sample
            save_file({"x": x.contiguous(), "step": torch.tensor(i + 1)}, str(partial / "next.tmp"))
            os.replace(partial / "next.tmp", partial / "next.safetensors")
    os.replace(partial / "steps", out / "steps")
    tensors = {"labels": labels}
    if cond is not None:
        tensors["encoder_hidden_states"] = cond.contiguous()
    save_file(tensors, str(out / "cond.safetensors"))
    meta = {"steps": cfg.steps, "num_samples": cfg.num_samples, "timesteps": timesteps,
            "sample_shape": list(model.sample_shape), "num_train_timesteps": model.num_train_timesteps}
    (out / "calib.json").write_text(json.dumps(meta, indent=2))
    ctx.on_success.append(lambda: shutil.rmtree(partial, ignore_errors=True))
    return {"steps": cfg.steps, "num_samples": cfg.num_samples, "timesteps": [timesteps[0], timesteps[-1]]}


@dataclass
class CalibrationData:
    """Read side of the calibration stage, used by finetune and verify."""

    folder: Path

    def __post_init__(self):
        self.meta = json.loads((self.folder / "calib.json").read_text())
        c = load_file(str(self.folder / "cond.safetensors"))
        self.labels = c["labels"]
        self.cond = c.get("encoder_hidden_states")

    @property
    def timesteps(self) -> list[int]:
        return self.meta["timesteps"]

    def step(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, FP eps) of sampler step i; validated, since NaN in here poisons every scale."""
        path = self.folder / "steps" / f"step_{i:03d}.safetensors"
        try:
            d = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - corrupt file from any cause
            raise DataError(f"calibration file {path} is unreadable ({e}).",
                            hint="re-run `questdeploy calibrate --force`.") from None
        for k, v in d.items():
            if not torch.isfinite(v).all():
                raise DataError(f"calibration file {path} has NaN/Inf in '{k}'.",
                                hint="re-run `questdeploy calibrate --force`; check the model for NaN weights.")
        return d["sample"], d["eps"]

    def __len__(self) -> int:
        return len(self.timesteps)


STAGE = Stage("calibrate", (), execute, "record the FP model's DDIM trajectory as calibration data")
