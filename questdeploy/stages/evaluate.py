"""Evaluation: sample with the FP or the quantized model and score the samples.

Writes ``metrics.json`` and ``samples_fp.png``; for a quantized model also ``samples_quantized.png``,
``compare_fp_vs_quantized.png`` (FP and quantized samples from the same noise) and ``per_timestep_error.png``
(the quantized model's noise prediction against FP's at every sampler step, both fed FP's own trajectory:
*where* in the sampling the quantization hurts). Classifier accuracy and FID-proxy need a digit model (the
embedded default or any 10-class, 1x16x16 model); PSNR vs FP works for every model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..images import save_grid
from ..metrics import frechet_distance, psnr
from ..runners.base import CONTEXT, SAMPLE, TIMESTEP
from ..sampling import batched_sample, initial_noise, unet_eps_fn
from .base import Stage, StageContext


@dataclass
class EvalConfig:
    num_samples: int = 500
    steps: int = 25
    batch_size: int = 250
    quantized: bool = False
    per_timestep_samples: int = 100  # the first samples (10 per digit) whose FP trajectory feeds the error plot
    blame: bool = False                # also rank the activation quantizers by their share of the error
    blame_steps: int = 2               # ... at this many sampler steps, those with the largest error

    def __post_init__(self):
        if min(self.num_samples, self.steps, self.batch_size, self.per_timestep_samples, self.blame_steps) < 1:
            raise ConfigError("--num-samples, --steps, --batch-size (and per_timestep_samples, blame_steps) must be positive.",
                              hint="e.g. --num-samples 500 --steps 25.")
        if self.blame and not self.quantized:
            raise ConfigError("--blame ranks the quantized model's activation quantizers.", hint="add --quantized.")


def _is_digit_model(ctx: StageContext) -> bool:
    return ctx.model.conditioner.num_classes == 10 and tuple(ctx.model.sample_shape) == (1, 16, 16)


def digit_scores(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy of the project's classifier on samples of requested labels, and FID-proxy vs real digits."""
    from ..zoo.classifier import load_default_classifier
    from ..zoo.data import heldout_digits

    clf = load_default_classifier()
    real, _ = heldout_digits()
    with torch.no_grad():
        logits = torch.cat([clf(images[i:i + 500]) for i in range(0, len(images), 500)])
        feats = torch.cat([clf.features(images[i:i + 500]) for i in range(0, len(images), 500)])
        real_feats = torch.cat([clf.features(real[i:i + 500]) for i in range(0, len(real), 500)])
    acc = (logits.argmax(1) == labels).float().mean().item()
    return {"classifier_accuracy": round(acc, 4), "fid_proxy": round(frechet_distance(feats.numpy(), real_feats.numpy()), 4)}


def _eval_inputs(ctx: StageContext, cfg: EvalConfig, n: int):
    """Labels (cycling through the classes), conditioning and seeded noise of the first ``n`` evaluation samples."""
    labels = torch.arange(n) % max(ctx.model.conditioner.num_classes, 1)
    noise = initial_noise(cfg.num_samples, ctx.model.sample_shape, ctx.seed)[:n]
    return labels, ctx.model.conditioner(labels), noise


def generate(ctx: StageContext, eps_fn, cfg: EvalConfig, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    labels, cond, noise = _eval_inputs(ctx, cfg, cfg.num_samples)
    images = batched_sample(eps_fn, ctx.model.scheduler_config, noise, cond, cfg.steps, cfg.batch_size,
                            progress=ctx.progress, desc=desc)
    return images, labels


def per_timestep_error(ctx: StageContext, test, cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """The ``test`` runner's noise prediction against the FP UNet's at every DDIM step of FP's own trajectory
    (teacher forcing: the errors do not compound), on the first ``cfg.per_timestep_samples`` evaluation samples
    (same noise and labels): verify's per-timestep comparison, run on the PyTorch models. Returns the rows
    (timestep, relative L2, cosine, max-abs) and the feeds, one per step."""
    from ..export.verify import per_timestep_errors, trajectory_feeds
    from ..runners.torch_runner import TorchRunner

    _, cond, noise = _eval_inputs(ctx, cfg, min(cfg.num_samples, cfg.per_timestep_samples))
    fp = TorchRunner(ctx.model.unet, "fp")
    feeds = trajectory_feeds(fp, ctx.model.scheduler_config, noise, cond, cfg.steps)
    return per_timestep_errors(fp, test, feeds), feeds


def blame(ctx: StageContext, qunet, rows: list[dict], feeds: list[dict], steps: int, top: int = 20) -> dict:
    """The activation quantizers that cost most at the ``steps`` sampler steps with the largest error
    (leave-one-out shares against FP, ``quant/sensitivity.py``), largest first: where higher precision would pay."""
    from ..quant.sensitivity import activation_error_shares

    worst = sorted(sorted(range(len(rows)), key=lambda i: rows[i]["rel_l2"], reverse=True)[:steps])
    fp_eps, batches = unet_eps_fn(ctx.model.unet), []
    with torch.no_grad():
        for feed in (feeds[i] for i in worst):
            x, t = torch.from_numpy(feed[SAMPLE]), torch.from_numpy(feed[TIMESTEP])
            c = torch.from_numpy(feed[CONTEXT]) if CONTEXT in feed else None
            batches.append((x, t, c, fp_eps(x, t, c)))
    shares = activation_error_shares(qunet, batches, progress=ctx.progress)
    ranked = sorted(shares.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {"timesteps": [rows[i]["timestep"] for i in worst],
            "quantizers": [{"name": n, "error_share": s} for n, s in ranked]}


def _grid_order(images: torch.Tensor, labels: torch.Tensor, per_class: int = 10) -> torch.Tensor:
    """Rows of one class each (10 x 10 for digits) so a person sees at a glance which digit fails."""
    k = int(labels.max()) + 1
    if k <= 1:
        return images[:100]
    rows = [images[labels == c][:per_class] for c in range(min(k, 10))]
    return torch.cat(rows)


def execute(ctx: StageContext, cfg: EvalConfig, out: Path) -> dict:
    fp_images, labels = generate(ctx, unet_eps_fn(ctx.model.unet), cfg, "sampling (fp)")
    metrics: dict = {"num_samples": cfg.num_samples, "steps": cfg.steps, "model": ctx.model.path}
    save_grid(_grid_order(fp_images, labels), out / "samples_fp.png")
    digit = _is_digit_model(ctx)
    if digit:
        metrics["fp"] = digit_scores(fp_images, labels)
    if cfg.quantized:
        from ..quant.spec import load_checkpoint

        qunet = load_checkpoint(ctx.model.unet, ctx.run.stage_dir("finetune") / "checkpoint")
        qunet.eval()
        q_images, _ = generate(ctx, qunet, cfg, "sampling (quantized)")
        p = psnr(q_images, fp_images)
        metrics["quantized"] = {"psnr_vs_fp_db": round(p.mean().item(), 3), "psnr_vs_fp_min_db": round(p.min().item(), 3)}
        if digit:
            metrics["quantized"].update(digit_scores(q_images, labels))
        save_grid(_grid_order(q_images, labels), out / "samples_quantized.png")
        both = torch.stack([_grid_order(fp_images, labels), _grid_order(q_images, labels)], 1).flatten(0, 1)
        save_grid(both, out / "compare_fp_vs_quantized.png", nrow=20)
        from ..export.verify import plot_per_timestep, summarize_steps

        from ..runners.torch_runner import TorchRunner

        rows, feeds = per_timestep_error(ctx, TorchRunner(qunet, "quantized"), cfg)
        metrics["per_timestep"] = {"samples": len(feeds[0][SAMPLE]), **summarize_steps(rows), "rows": rows}
        plot_per_timestep({"quantized vs FP": rows}, out / "per_timestep_error.png",
                          title="quantized vs FP noise prediction on FP's trajectory")
        if cfg.blame:
            metrics["blame"] = blame(ctx, qunet, rows, feeds, cfg.blame_steps)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = dict(metrics)  # for the manifest and the console: the per-step rows stay in metrics.json
    if "per_timestep" in summary:
        summary["per_timestep"] = {k: v for k, v in summary["per_timestep"].items() if k != "rows"}
    if "blame" in summary:
        summary["blame"] = {q["name"]: round(q["error_share"], 4) for q in summary["blame"]["quantizers"][:5]}
    return summary


STAGE_FP = Stage("eval", (), execute, "sample and score the full-precision model")
STAGE_QUANT = Stage("eval-quantized", ("finetune",), execute, "sample and score the quantized model against FP")
