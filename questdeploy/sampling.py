"""DDIM sampling shared by calibration, evaluation and verification.

The sampler takes any ``eps(sample, timestep, encoder_hidden_states) -> noise`` callable, so the same
loop drives the FP UNet, the quantized PyTorch model, onnxruntime or a TensorRT engine.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def make_scheduler(scheduler_config: dict, steps: int):
    """A DDIM scheduler on the model's training noise schedule, set to ``steps`` inference steps."""
    from diffusers import DDIMScheduler

    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    return sched


def sampler_timesteps(scheduler_config: dict, steps: int) -> list[int]:
    return [int(t) for t in make_scheduler(scheduler_config, steps).timesteps]


def unet_eps_fn(unet: torch.nn.Module) -> EpsFn:
    """Adapter: a diffusers UNet (FP) as an eps callable."""

    def eps(sample, t, cond):
        kwargs = {} if cond is None else {"encoder_hidden_states": cond}
        return unet(sample, t, **kwargs).sample

    return eps


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    scheduler_config: dict,
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    steps: int,
    on_step: StepHook | None = None,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``noise``; ``on_step(i, t, x_t, eps)`` sees every UNet call."""
    sched = make_scheduler(scheduler_config, steps)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(tqdm(sched.timesteps, desc=desc, disable=not progress, leave=False)):
        t_batch = t.expand(x.shape[0]) if t.ndim == 0 else t
        eps = eps_fn(x, t_batch, cond)
        if on_step is not None:
            on_step(i, t, x, eps)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded starting noise, identical for every model that samples from it (PSNR pairs need this)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


def batched_sample(eps_fn: EpsFn, scheduler_config: dict, noise: torch.Tensor, cond: torch.Tensor | None,
                   steps: int, batch_size: int, progress: bool = False, desc: str = "sampling") -> torch.Tensor:
    """``ddim_sample`` in chunks to bound memory; results equal the unchunked call per sample."""
    outs = []
    chunks = range(0, noise.shape[0], batch_size)
    for start in tqdm(chunks, desc=desc, disable=not progress or len(chunks) == 1):
        sl = slice(start, start + batch_size)
        outs.append(ddim_sample(eps_fn, scheduler_config, noise[sl], None if cond is None else cond[sl], steps,
                                progress=progress and len(chunks) == 1, desc=desc))
    return torch.cat(outs)
