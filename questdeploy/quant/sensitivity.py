"""Which layers keep 8-bit weights at W4: measured on the calibration data, not guessed by name.

Why: 4-bit weight error is far from uniform over a UNet. On the default model the eight ResNet convs
at full resolution hold 5.3 % of the weights and about 85 % of the W4 noise-prediction error (their
outputs reach ``conv_out`` with nothing in between to average the error away). A weight budget spent
on the layers that hurt most buys most of the W8 quality for a few percent of the size.

The measurement quantizes one layer's weights at a time (everything else float, activations off) and
scores the UNet's noise prediction against the FP model's on calibration inputs of every recorded step.
Layers are then taken largest error first while they fit the budget (a fraction of all 4-bit weights);
the choice lands in ``QuantConfig.weight_8bit`` and so in the spec. Largest error, not error per weight:
ranked per weight, tiny layers with tiny errors (time projections, 1x1 convs) filled the budget before
the big full-resolution convs that carry the error, and the default model lost 0.7 FID-proxy for it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..sampling import unet_eps_fn
from .quantizers import ActQuantizer
from .smoothing import apply_smoothing
from .wrap import QuantConfig, quantize_unet

__all__ = ["weight_sensitivity", "choose_8bit_weights", "activation_error_shares"]

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@torch.no_grad()
def weight_sensitivity(fp_unet: nn.Module, config: QuantConfig, batches: Iterable[Batch],
                       progress: bool = False, smoothing: dict | None = None) -> dict[str, float]:
    """Per layer quantized at ``config.w_bits``: relative squared error of the noise prediction when only
    that layer's weights are quantized (round-to-nearest from the L_p-searched scales). Layers that
    ``config.weight_8bit`` already keeps at 8 bits are not scored.

    ``batches`` yield ``(sample, timestep, cond)``; timesteps may differ within a batch (activations are
    off, so no timestep group is involved).
    """
    weights_only = dataclasses.replace(config, a_bits=None, attn_bits=None)
    qunet = quantize_unet(fp_unet, weights_only)
    apply_smoothing(qunet.unet, smoothing or {})  # the smoothed weights are the ones that get quantized
    qunet.init_weight_scales()
    inputs = list(batches)
    fp_eps, q_eps = unet_eps_fn(fp_unet), unet_eps_fn(qunet.unet)
    refs = [fp_eps(*b) for b in inputs]
    denom = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    layers = {n: m for n, m in qunet.quant_layers().items()
              if m.weight_quantizer is not None and m.weight_quantizer.bits == config.w_bits}
    scores: dict[str, float] = {}
    with qunet.quant_enabled(False):
        for name, layer in tqdm(layers.items(), desc="weight sensitivity", disable=not progress, leave=False):
            layer.weight_quantizer.enabled = True
            err = sum(float((q_eps(*b) - r).pow(2).sum()) for b, r in zip(inputs, refs))
            layer.weight_quantizer.enabled = False
            scores[name] = err / denom
    return scores


def choose_8bit_weights(sensitivity: dict[str, float], sizes: dict[str, int], budget: float) -> list[str]:
    """Layers to keep at 8 bits: largest error first, each taken if its weights still fit in ``budget``
    (a fraction of all weights in ``sizes``). Layers that cost nothing are never chosen.
    Returned in the order of ``sizes`` (model order), so the spec reads like the model."""
    total = sum(sizes.values())
    allowance = budget * total
    ranked = sorted((n for n in sizes if sensitivity.get(n, 0.0) > 0.0), key=lambda n: sensitivity[n], reverse=True)
    chosen, used = set(), 0
    for name in ranked:
        if used + sizes[name] <= allowance:
            chosen.add(name)
            used += sizes[name]
    return [n for n in sizes if n in chosen]


@torch.no_grad()
def activation_error_shares(qunet: nn.Module, batches: Iterable[tuple], progress: bool = False) -> dict[str, float]:
    """Per enabled activation quantizer of ``qunet``: the share of the noise-prediction error (squared, against
    each batch's reference ``eps``) that disappears when that one quantizer alone is switched off
    (leave-one-out). Shares do not add up to 1 (errors interact) and may be negative.

    Why: after finetuning, a few quantizers usually carry most of what is left (on the default model at W4A4,
    seven full-resolution ResNet conv inputs carry 61 % of quest's error at the last two sampler steps); this names
    them. ``batches`` yield ``(sample, timestep, cond, eps_ref)``; each batch's timestep selects its group.
    """
    inputs = list(batches)

    def error() -> float:
        return sum(float((qunet(x, t, c) - ref).pow(2).sum()) for x, t, c, ref in inputs)

    base = error()
    acts = {n: q for n, q in qunet.quantizers().items() if isinstance(q, ActQuantizer) and q.enabled}
    shares: dict[str, float] = {}
    for name, q in tqdm(acts.items(), desc="activation error shares", disable=not progress, leave=False):
        q.enabled = False
        try:
            shares[name] = (base - error()) / base if base > 0 else 0.0
        finally:
            q.enabled = True
    return shares
