"""Minimal DDIM (eta = 0) sampling of the digit model, to check sample quality.

The project's own sampling loop lives in questdeploy/sampling.py; this one is kept small on purpose.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from questdeploy.zoo.pipeline import DigitPipeline, load_pipeline


@torch.no_grad()
def sample_digits(
    pipeline: str | os.PathLike | DigitPipeline | None,
    labels: Sequence[int] | torch.Tensor,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 250,
) -> torch.Tensor:
    """Generate one 16x16 digit per label: (N, 1, 16, 16) float32 in [-1, 1].

    `pipeline` is a pipeline folder (None = the shipped one) or an already loaded `DigitPipeline`. The initial noise
    for all N images is drawn at once from a generator seeded with `seed`, so results do not depend on `batch_size`.
    """
    from diffusers import DDIMScheduler

    pipe = pipeline if isinstance(pipeline, DigitPipeline) else load_pipeline(pipeline)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    cfg = pipe.unet.config
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    out = []
    for i in range(0, len(labels), batch_size):
        x = noise[i : i + batch_size]
        cond = pipe.encode(labels[i : i + batch_size])
        for t in scheduler.timesteps:
            eps = pipe.unet(x, t, encoder_hidden_states=cond).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1.0, 1.0))
    return torch.cat(out) if out else noise


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier=None) -> tuple[float, torch.Tensor]:
    """Fraction of `images` that the (default) digit classifier assigns to `labels`, and the per-class fractions."""
    from questdeploy.zoo.classifier import load_default_classifier

    clf = classifier if classifier is not None else load_default_classifier()
    labels = torch.as_tensor(labels, dtype=torch.long)
    hit = (clf.predict(images) == labels).float()
    per_class = torch.stack([hit[labels == c].mean() for c in range(clf.config.num_classes)])
    return float(hit.mean()), per_class
