"""PyTorch runner: a ``QuantizedUNet`` (fake quantization) or a float diffusers UNet."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from .base import CONTEXT, OUTPUT, SAMPLE, TIMESTEP, Runner


class TorchRunner(Runner):
    """Runs ``model(sample, timestep[, encoder_hidden_states])`` under ``torch.no_grad`` in float32.

    Accepts a ``QuantizedUNet`` (returns a tensor) or a diffusers ``UNet2DModel`` /
    ``UNet2DConditionModel`` (returns an output object with ``.sample``) or any callable returning either.
    """

    def __init__(self, model, name: str | None = None):
        super().__init__(name or f"torch-{type(model).__name__}")
        self.model = model
        fwd = getattr(model, "forward", model)
        try:
            params = inspect.signature(fwd).parameters
        except (TypeError, ValueError):
            params = {}
        base = getattr(model, "unet", None)
        if base is not None and hasattr(model, "_conditional"):
            self.conditional = bool(model._conditional)
        else:
            self.conditional = CONTEXT in params

    def activate_impl(self) -> None:
        if isinstance(self.model, torch.nn.Module):
            self.model.eval()

    @torch.no_grad()
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sample = torch.from_numpy(feed[SAMPLE])
        t = torch.from_numpy(feed[TIMESTEP])
        if t.numel() == 1 and sample.shape[0] > 1:
            t = t.expand(sample.shape[0])
        args = [sample, t]
        kwargs = {}
        if self.conditional:
            kwargs[CONTEXT] = torch.from_numpy(feed[CONTEXT])
        out = self.model(*args, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return {OUTPUT: out.detach().float().cpu().numpy()}
