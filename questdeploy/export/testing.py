"""Small random diffusers UNets for tests, examples and benchmarks (no weights are downloaded).

``tiny_cond_unet`` / ``tiny_uncond_unet``: seconds to trace, every quantizer kind present (convs,
linears, self- and cross-attention). ``sd_shaped_unet``: Stable Diffusion's block layout at reduced
width, big enough to be compute-bound on a CPU (benchmarks). ``calibrate_random`` initialises a
``QuantizedUNet``'s scales from random inputs spread over all timestep groups.
Random weights amplify one-LSB rounding differences between backends: judge numerical agreement on
them per quantizer (``verify.quantizer_exactness`` / ``per_layer_compare``), not end to end.
"""

from __future__ import annotations

import torch


def tiny_cond_unet(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=1, out_channels=1, cross_attention_dim=cross_attention_dim,
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_uncond_unet(seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=8, norm_num_groups=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    ).eval()


def sd_shaped_unet(seed: int = 0, width: tuple[int, ...] = (64, 128, 256), sample_size: int = 64,
                   cross_attention_dim: int = 768, layers_per_block: int = 1, attention_head_dim: int = 8,
                   attention_at_top: bool = False):
    """Stable Diffusion 1.x's UNet layout (4 latent channels, 77 x 768 context, cross-attention blocks, last
    level without attention) at reduced width. ``attention_at_top=False`` drops attention from the
    full-resolution level: 4096-token attention at batch 8 needs ~4 GB of probabilities alone, too much for a
    CPU benchmark; the other levels keep SD's cross-attention blocks."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(width)
    first = "CrossAttnDownBlock2D" if attention_at_top else "DownBlock2D"
    last = "CrossAttnUpBlock2D" if attention_at_top else "UpBlock2D"
    down = tuple([first] + ["CrossAttnDownBlock2D"] * (n - 2) + ["DownBlock2D" if attention_at_top else "CrossAttnDownBlock2D"])
    up = tuple(["UpBlock2D" if attention_at_top else "CrossAttnUpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 2) + [last])
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim,
        block_out_channels=tuple(width), layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
        down_block_types=down, up_block_types=up, norm_num_groups=32,
    ).eval()


def random_batches(unet, timesteps, batch_size: int = 2, seq_len: int = 4, seed: int = 0):
    """``(sample, timestep, cond)`` batches shaped for ``unet`` (cond None for unconditional UNets)."""
    import inspect

    cfg = unet.config
    base = getattr(unet, "unet", unet)
    conditional = "encoder_hidden_states" in inspect.signature(base.forward).parameters
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    out = []
    for t in timesteps:
        x = torch.randn(batch_size, cfg.in_channels, size, size, generator=g)
        c = torch.randn(batch_size, seq_len, cfg.cross_attention_dim, generator=g) if conditional else None
        out.append((x, torch.full((batch_size,), float(t)), c))
    return out


def calibrate_random(qunet, batch_size: int = 2, per_group: int = 1, seq_len: int = 4, seed: int = 0) -> dict:
    """PTQ init of ``qunet`` from random inputs, ``per_group`` batches in the middle of every timestep bin."""
    edges = list(qunet.bins.edges)
    ts = []
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        ts += [lo + (hi - lo) * (k + 1) / (per_group + 1) for k in range(per_group)]
    return qunet.calibrate_activations(random_batches(qunet, ts, batch_size, seq_len, seed))


_CACHE: dict = {}


def cached(key, build):
    """Process-wide memo (test sessions trace each tiny model once and lower it many times)."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]
