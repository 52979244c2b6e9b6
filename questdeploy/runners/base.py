"""One small runner interface over PyTorch, onnxruntime and ``onnx.reference`` (Polygraphy-style).

A runner is activated (session created / model prepared), runs ``infer(feed) -> {output name: array}``
any number of times, and is deactivated; ``with runner:`` does both. Feeds and results are NumPy arrays
keyed by the exported graph's names (``sample``, ``timestep``, ``encoder_hidden_states`` ->
``out_sample``). ``runner.eps(sample, t, cond)`` adapts any runner to the ``EpsFn`` callable that
``questdeploy.sampling.ddim_sample`` drives, so one sampling loop runs every backend.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

SAMPLE, TIMESTEP, CONTEXT, OUTPUT = "sample", "timestep", "encoder_hidden_states", "out_sample"


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def make_feed(sample, timestep, encoder_hidden_states=None) -> dict[str, np.ndarray]:
    """Graph feed from UNet-call arguments: ``timestep`` becomes float32 ``[n]`` (a scalar becomes ``[1]``)."""
    feed = {
        SAMPLE: np.ascontiguousarray(to_numpy(sample), dtype=np.float32),
        TIMESTEP: np.ascontiguousarray(to_numpy(timestep), dtype=np.float32).reshape(-1),
    }
    if encoder_hidden_states is not None:
        feed[CONTEXT] = np.ascontiguousarray(to_numpy(encoder_hidden_states), dtype=np.float32)
    return feed


class Runner:
    """Base class: subclasses implement ``activate_impl``, ``infer_impl`` and optionally ``deactivate_impl``."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self.inference_time: float | None = None  # seconds of the last infer()

    # -- lifecycle ---------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate_impl(self) -> None:  # pragma: no cover - trivial default
        pass

    def deactivate_impl(self) -> None:  # pragma: no cover - trivial default
        pass

    # -- inference ---------------------------------------------------------------------------------
    def infer(self, feed: Mapping[str, object]) -> dict[str, np.ndarray]:
        """Run once; activates lazily. Inputs may be NumPy arrays or torch tensors."""
        self.activate()
        feed = dict(feed)
        if TIMESTEP in feed:
            feed[TIMESTEP] = np.asarray(to_numpy(feed[TIMESTEP]), dtype=np.float32).reshape(-1)
        feed = {k: np.ascontiguousarray(to_numpy(v)) for k, v in feed.items()}
        start = time.perf_counter()
        out = self.infer_impl(feed)
        self.inference_time = time.perf_counter() - start
        return out

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def eps(self, sample, timestep, encoder_hidden_states=None):
        """``EpsFn`` adapter: torch tensors in, the ``out_sample`` torch tensor out."""
        import torch

        out = self.infer(make_feed(sample, timestep, encoder_hidden_states))[OUTPUT]
        return torch.from_numpy(np.ascontiguousarray(out))

    __call__ = eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
