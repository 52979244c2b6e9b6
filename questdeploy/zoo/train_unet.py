"""Train the embedded default model: a small class-conditional diffusers UNet2DConditionModel on 16x16 digits.

The model mirrors Stable Diffusion's UNet at toy scale (convs, linears, self- and cross-attention, a time embedding);
its "text encoder" is a learned table of `num_tokens` tokens per class (questdeploy/zoo/embeddings.py), trained
jointly with the UNet. Epsilon prediction, DDPM training on a cosine (squaredcos_cap_v2) schedule of 1000 steps,
AdamW with warmup + cosine decay, min-SNR loss weighting, EMA of the weights (the EMA weights are saved).

    python -m questdeploy.zoo.train_unet --out questdeploy/zoo/weights/digits

Deterministic for a given --seed and --threads on one machine: seeded init, data order, timesteps and noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from questdeploy.errors import ConfigError
from questdeploy.zoo.data import NUM_CLASSES, split_digits
from questdeploy.zoo.embeddings import ClassEmbeddings
from questdeploy.zoo.pipeline import DEFAULT_PIPELINE_DIR, save_pipeline


@dataclass(frozen=True)
class UNetTrainConfig:
    """Model shape, noise schedule and optimisation settings of one training run."""

    # model
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    num_attention_heads: int = 4
    norm_num_groups: int = 8
    cross_attention_dim: int = 64
    num_tokens: int = 4
    sample_size: int = 16
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # optimisation
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 0 = plain MSE
    seed: int = 0
    split_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"block_out_channels, down_block_types and up_block_types need the same length, got "
                f"{n}, {len(self.down_block_types)}, {len(self.up_block_types)}.",
                hint="give one down and one up block type per entry of block_out_channels.",
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"every block width must be divisible by norm_num_groups={self.norm_num_groups}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1.")


@dataclass
class UNetTrainResult:
    unet: "torch.nn.Module"  # EMA weights
    class_embeddings: ClassEmbeddings  # EMA weights
    scheduler: object  # DDIMScheduler to sample with
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 100 steps (or fewer)."""
        tail = self.losses[-100:]
        return sum(tail) / len(tail) if tail else float("nan")


def build_unet(config: UNetTrainConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=1,
        out_channels=1,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        # diffusers' legacy naming: for this class `attention_head_dim` is the number of heads per block
        attention_head_dim=config.num_attention_heads,
        norm_num_groups=config.norm_num_groups,
    )


def build_scheduler(config: UNetTrainConfig):
    """The DDIM scheduler shipped with the model (same betas as training; eta is chosen at sampling time)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )


def train_unet(
    config: UNetTrainConfig,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    progress: bool = True,
) -> UNetTrainResult:
    """Train UNet + class embeddings; returns the EMA weights. Default data: the 4500 training digits."""
    from tqdm.auto import tqdm

    if images is None or labels is None:
        split = split_digits(seed=config.split_seed)
        images, labels = split.train_images, split.train_labels
    torch.manual_seed(config.seed)
    unet = build_unet(config)
    embeddings = ClassEmbeddings(NUM_CLASSES, config.num_tokens, config.cross_attention_dim)
    scheduler = build_scheduler(config)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)

    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_emb = copy.deepcopy(embeddings).requires_grad_(False)
    params = list(unet.parameters()) + list(embeddings.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_emb.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "weight_decay": config.weight_decay},
            {"params": list(embeddings.parameters()), "weight_decay": 0.0},
        ],
        lr=config.lr,
    )

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(config.seed + 1)
    n = len(images)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses: list[float] = []
    unet.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="unet", disable=not progress, mininterval=2.0)
    for step in bar:
        if pos + config.batch_size > n:  # new epoch: drop the ragged tail, reshuffle
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=embeddings(y)).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma > 0:
            s = snr[t]
            per_sample = per_sample * torch.clamp(s, max=config.snr_gamma) / s
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        lr_sched.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        losses.append(loss.item())
        if step % 20 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return UNetTrainResult(
        unet=ema_unet.eval(),
        class_embeddings=ema_emb.eval(),
        scheduler=scheduler,
        losses=losses,
        seconds=time.perf_counter() - start,
    )


def evaluate_samples(pipeline_folder: str | os.PathLike, per_class: int, steps: int, seed: int) -> dict:
    """Generate `per_class` digits of each class with DDIM and score them with the shipped classifier."""
    from questdeploy.zoo.sample import class_accuracy, sample_digits

    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    start = time.perf_counter()
    images = sample_digits(pipeline_folder, labels, steps=steps, seed=seed)
    acc, per = class_accuracy(images, labels)
    return {
        "samples": len(labels),
        "ddim_steps": steps,
        "sample_seed": seed,
        "sample_accuracy": round(acc, 4),
        "per_class_accuracy": [round(float(a), 3) for a in per],
        "sample_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    defaults = UNetTrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m questdeploy.zoo.train_unet",
        description="Train the class-conditional 16x16 digit UNet and write the pipeline folder "
        "(model_index.json, unet/, scheduler/, class_embeddings/) atomically.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_PIPELINE_DIR, help="pipeline folder to (re)write")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--snr-gamma", type=float, default=defaults.snr_gamma, help="min-SNR weighting; 0 = off")
    parser.add_argument(
        "--channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=defaults.block_out_channels,
        help="block_out_channels, comma separated (3 levels)",
    )
    parser.add_argument("--num-tokens", type=int, default=defaults.num_tokens, help="tokens per class")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--eval-per-class", type=int, default=50,
        help="after training, sample this many digits per class and score them with the shipped classifier (0 = skip)",
    )
    parser.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for the evaluation samples")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    config = UNetTrainConfig(
        block_out_channels=args.channels,
        num_tokens=args.num_tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        snr_gamma=args.snr_gamma,
        seed=args.seed,
        split_seed=args.split_seed,
    )
    result = train_unet(config, progress=not args.no_progress)
    save_pipeline(args.out, result.unet, result.scheduler, result.class_embeddings)
    summary = {
        "out": str(args.out),
        "params": sum(p.numel() for p in result.unet.parameters()),
        "train_seconds": round(result.seconds, 1),
        "final_loss_last100": round(result.final_loss, 5),
        "config": asdict(config),
    }
    if args.eval_per_class > 0:
        summary.update(evaluate_samples(args.out, args.eval_per_class, args.eval_steps, args.eval_seed))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
