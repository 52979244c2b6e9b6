"""Error-compensating weight rounding (GPTQ, Frantar et al. 2022) for the frozen-scale weight quantizers.

Why: at 4 bits, rounding every weight to the nearest grid point (RTN) is what costs W4A8 most of its
quality. QuEST's reference code buys it back with AdaRound block reconstruction (~20k iterations per
block); GPTQ reaches the same kind of gain in one pass per layer: columns are rounded one at a time
and each rounding error is pushed onto the not-yet-rounded columns in proportion to the inverse
Hessian ``H = X Xᵀ`` of the layer's inputs, so the layer *output* error on the calibration inputs is
what gets minimised, not the weight error.

It only changes float weights: the quantizer's scales (found by the L_p search) stay as they are, and
the layer's weight becomes exactly ``scale * q``, so the exported integer weight is ``q`` and nothing
downstream (spec, export, finetuning) needs to know GPTQ ran.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .primitives import PerBlock
from .quantizers import WeightQuantizer

__all__ = ["HessianCollector", "gptq_round", "gptq_quantize_layers"]


def _layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer input as rows that multiply ``weight.reshape(out, -1)`` (conv: im2col patches)."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return None
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return None


class HessianCollector:
    """Forward pre-hooks accumulating ``Σ x xᵀ`` (float64) over each named layer's inputs."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.hessians: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def fn(module, args):
            rows = _layer_rows(module, args[0].detach())
            if rows is None:
                return
            rows = rows.double()
            h = rows.T @ rows
            if name in self.hessians:
                self.hessians[name] += h
                self.rows[name] += rows.shape[0]
            else:
                self.hessians[name], self.rows[name] = h, rows.shape[0]

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _column_scales(wq: WeightQuantizer, out: int, cols: int) -> torch.Tensor:
    """``(out, cols)`` scale of every weight element in the flattened ``(out, -1)`` layout."""
    s = wq.scale.detach().double()
    if isinstance(wq.granularity, PerBlock):
        return s.repeat_interleave(wq.granularity.block_size, dim=1)
    return s.reshape(out, 1).expand(out, cols)


@torch.no_grad()
def gptq_round(weight: torch.Tensor, wq: WeightQuantizer, hessian: torch.Tensor, damp: float = 0.01,
               act_order: bool = True) -> torch.Tensor:
    """Return ``scale * q`` for ``weight`` (same shape/dtype), ``q`` chosen by GPTQ under ``hessian``.

    ``damp`` adds ``damp * mean(diag H)`` to the diagonal (numerical safety, as in the paper);
    ``act_order`` rounds columns with the largest input energy first. Columns that never saw input
    (zero diagonal) are rounded to nearest: nothing can compensate them and nothing depends on them.
    """
    shape, dtype = weight.shape, weight.dtype
    W = weight.detach().reshape(shape[0], -1).double().clone()
    out, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match weight columns {cols}")
    S = _column_scales(wq, out, cols)
    qmin, qmax = wq.qmin, wq.qmax
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += torch.eye(cols, dtype=H.dtype, device=H.device) * damp * torch.diag(H).mean()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=H.device)
    W, S, H = W[:, perm], S[:, perm], H[perm][:, perm]
    dead = dead[perm]
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:  # not positive definite even after damping: fall back to nearest rounding
        return wq(weight.detach()).detach().to(dtype)
    Q = torch.empty_like(W)
    for i in range(cols):
        w = W[:, i]
        q = torch.clamp(torch.round(w / S[:, i]), qmin, qmax) * S[:, i]
        Q[:, i] = q
        if dead[i]:
            continue
        err = (w - q) / U[i, i]
        W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    inv = torch.argsort(perm)
    return Q[:, inv].reshape(shape).to(dtype)


@torch.no_grad()
def gptq_quantize_layers(fp_unet: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Callable[[], None]],
                         damp: float = 0.01, act_order: bool = True, progress: Callable[[str], None] | None = None
                         ) -> dict[str, float]:
    """GPTQ every quantized layer in ``layers`` (name -> QuantConv2d/QuantLinear) from the inputs the
    same-named layers of ``fp_unet`` see while each callable in ``batches`` runs the FP model.

    Hessians come from the full-precision teacher's activations (one pass, no sequential re-collection):
    cheap, and what the deployed layer's 8-bit input approximates. Returns per layer the relative
    output-error reduction ``1 - err_gptq / err_rtn`` on the calibration inputs (a health check).
    """
    fp_mods = dict(fp_unet.named_modules())
    targets = {n: l for n, l in layers.items() if getattr(l, "weight_quantizer", None) is not None and n in fp_mods}
    with HessianCollector({n: fp_mods[n] for n in targets}) as hc:
        for run in batches:
            run()
    gains: dict[str, float] = {}
    for n, layer in targets.items():
        if n not in hc.hessians:
            continue
        H = hc.hessians[n] / max(1, hc.rows[n])
        smooth = getattr(layer, "input_smooth", None)
        if smooth is not None:  # the layer sees x / s: H of the FP inputs becomes D^-1 H D^-1 (unfold is channel-major)
            d = smooth.double().repeat_interleave(H.shape[0] // smooth.numel()).to(H.device)
            H = H / (d[:, None] * d[None, :])
        wq = layer.weight_quantizer
        w = layer.weight.detach()
        new = gptq_round(w, wq, H, damp=damp, act_order=act_order)
        W = w.reshape(w.shape[0], -1).double()

        def out_err(wd):
            d = wd.reshape(w.shape[0], -1).double() - W
            return float(torch.einsum("oi,ij,oj->", d, H, d))

        e_rtn, e_new = out_err(wq(w).detach()), out_err(new)
        if e_new < e_rtn:
            layer.weight.data.copy_(new)
            gains[n] = 1.0 - e_new / max(e_rtn, 1e-30)
        else:
            gains[n] = 0.0
        if progress:
            progress(n)
    return gains
