"""Pure, stateless quantization math (no modules, no state).

Why a separate file: the exporter, the ONNX conformance tests and the quantizer modules must all agree
on *one* definition of quantize / dequantize. These functions follow ONNX ``QuantizeLinear`` /
``DequantizeLinear`` (opset 21) exactly, so a fake-quantized PyTorch tensor equals what onnxruntime,
``onnx.reference`` and TensorRT compute from the exported Q/DQ pair:

    q = saturate(round_half_to_even(x / scale) + zero_point)        # quantize
    y = (q - zero_point) * scale                                       # dequantize

Granularity mirrors ONNX: ``axis=None`` per-tensor; ``axis=a`` per-axis (1-D scale of length
``x.shape[a]``); ``axis=a, block_size=B`` blocked (scale has the rank of ``x`` and
``ceil(x.shape[a] / B)`` entries along ``a``). The small value objects ``PerTensor`` / ``PerAxis`` /
``PerBlock`` carry the same choice as data (``g.kwargs()`` gives ``axis`` / ``block_size``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import QuantConfigError, ScaleShapeError, TimestepError, UnsupportedBitsError

__all__ = [
    "qrange",
    "quantize",
    "dequantize",
    "fake_quant",
    "lsq_grad_scale",
    "PerTensor",
    "PerAxis",
    "PerBlock",
    "Granularity",
    "granularity_from_dict",
    "TimestepBins",
]


# --------------------------------------------------------------------------------------------------
# integer ranges


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range of a ``bits``-wide grid: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``.

    The full two's-complement range is used (no "narrow" -127), because that is what ONNX
    QuantizeLinear saturates to; symmetric scales are still derived from ``qmax``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise UnsupportedBitsError(
            f"bits must be an integer in [2, 16], got {bits!r}",
            hint="use bits=8 (INT8) or bits=4 (INT4); other widths have no deployable kernels",
        )
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


# --------------------------------------------------------------------------------------------------
# granularity value objects


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor (scale shape ``()`` or ``(1,)``)."""

    kind = "per_tensor"

    def kwargs(self) -> dict:
        return {"axis": None, "block_size": None}

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return ()

    def to_dict(self) -> dict:
        return {"granularity": self.kind, "axis": None, "block_size": None}


@dataclass(frozen=True)
class PerAxis:
    """One scale per index along ``axis`` (per output channel for weights: ``axis=0``)."""

    axis: int
    kind = "per_channel"

    def __post_init__(self):
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise QuantConfigError(f"PerAxis.axis must be an int, got {self.axis!r}", hint="e.g. PerAxis(0)")

    def kwargs(self) -> dict:
        return {"axis": self.axis, "block_size": None}

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (int(shape[self.axis]),)

    def to_dict(self) -> dict:
        return {"granularity": self.kind, "axis": self.axis, "block_size": None}


@dataclass(frozen=True)
class PerBlock:
    """One scale per block of ``block_size`` consecutive elements along ``axis``.

    For a Linear weight ``(out, in)`` blocks run along the input axis (``axis=1``): scale shape
    ``(out, in // block_size)``, the layout of ONNX ``DequantizeLinear(block_size=...)`` and of
    TensorRT's INT4 weight-only quantization.
    """

    axis: int
    block_size: int
    kind = "per_block"

    def __post_init__(self):
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise QuantConfigError(f"PerBlock.axis must be an int, got {self.axis!r}", hint="e.g. PerBlock(1, 32)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise QuantConfigError(
                f"PerBlock.block_size must be a positive int, got {self.block_size!r}",
                hint="typical block sizes are 16, 32, 64 or 128",
            )

    def kwargs(self) -> dict:
        return {"axis": self.axis, "block_size": self.block_size}

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        out = [int(s) for s in shape]
        out[self.axis] = -(-out[self.axis] // self.block_size)  # ceil, as ONNX
        return tuple(out)

    def to_dict(self) -> dict:
        return {"granularity": self.kind, "axis": self.axis, "block_size": self.block_size}


Granularity = PerTensor | PerAxis | PerBlock


def granularity_from_dict(d: dict) -> Granularity:
    """Inverse of ``g.to_dict()`` (used by the JSON spec)."""
    kind = d.get("granularity")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerAxis(int(d["axis"]))
    if kind == "per_block":
        return PerBlock(int(d["axis"]), int(d["block_size"]))
    raise QuantConfigError(
        f"unknown granularity {kind!r}", hint="use one of 'per_tensor', 'per_channel', 'per_block'"
    )


# --------------------------------------------------------------------------------------------------
# scale broadcasting


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ScaleShapeError(
            f"axis {axis} is out of range for a tensor of rank {ndim}",
            hint=f"use an axis in [{-ndim}, {ndim - 1}]",
        )
    return axis % max(ndim, 1)


def _expand(param: torch.Tensor, x_shape: torch.Size, axis: int | None, block_size: int | None, what: str) -> torch.Tensor:
    """Reshape a scale / zero point so it broadcasts against ``x`` (differentiable)."""
    ndim = len(x_shape)
    if block_size is not None and block_size != 0:
        if axis is None:
            raise ScaleShapeError(f"block_size={block_size} needs an axis", hint="pass axis=1 for a Linear weight")
        a = _norm_axis(axis, ndim)
        n = x_shape[a]
        nb = -(-n // block_size)
        expected = list(x_shape)
        expected[a] = nb
        if list(param.shape) != expected:
            raise ScaleShapeError(
                f"blocked {what} must have shape {tuple(expected)} for input {tuple(x_shape)}, axis={a}, "
                f"block_size={block_size}; got {tuple(param.shape)}",
                hint="the blocked scale has the rank of the input and ceil(dim / block_size) entries along axis",
            )
        return param.repeat_interleave(block_size, dim=a).narrow(a, 0, n)
    if param.numel() == 1:  # one value broadcasts like a per-tensor parameter (as in ONNX)
        return param.reshape(())
    if axis is None:
        raise ScaleShapeError(
            f"per-tensor {what} must have one element, got shape {tuple(param.shape)}",
            hint="pass axis=<channel axis> for a per-channel scale",
        )
    a = _norm_axis(axis, ndim)
    if param.dim() != 1 or param.shape[0] != x_shape[a]:
        raise ScaleShapeError(
            f"per-axis {what} must be 1-D of length {x_shape[a]} (input {tuple(x_shape)}, axis={a}); "
            f"got shape {tuple(param.shape)}",
            hint="use one scale per index along the quantization axis",
        )
    shape = [1] * ndim
    shape[a] = x_shape[a]
    return param.reshape(shape)


def _check_zero_point(zero_point, qmin: int, qmax: int):
    if zero_point is None:
        return
    zp = torch.as_tensor(zero_point)
    if zp.numel() and (zp.min() < qmin or zp.max() > qmax):
        raise ScaleShapeError(
            f"zero point outside the integer range [{qmin}, {qmax}]",
            hint="choose signed=False for uint grids or a zero point inside the range",
        )


# --------------------------------------------------------------------------------------------------
# quantize / dequantize


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    bits: int = 8,
    signed: bool = True,
    axis: int | None = None,
    block_size: int | None = None,
    zero_point: torch.Tensor | int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``.

    Returns an integer-valued tensor in ``x``'s dtype (or ``out_dtype``, e.g. ``torch.int8``;
    INT4 values are stored in int8). Division (not multiplication by ``1/scale``) keeps the result
    bit-identical to onnxruntime and ``onnx.reference``.
    """
    qmin, qmax = qrange(bits, signed)
    scale = torch.as_tensor(scale, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    s = _expand(scale, x.shape, axis, block_size, "scale")
    v = torch.round(x / s)
    if zero_point is not None:
        _check_zero_point(zero_point, qmin, qmax)
        zp = torch.as_tensor(zero_point, device=x.device).to(v.dtype)
        v = v + _expand(zp, x.shape, axis, block_size, "zero point")
    q = torch.clamp(v, qmin, qmax) + 0.0  # + 0.0 turns -0.0 into 0.0: integers have no signed zero
    return q if out_dtype is None else q.to(out_dtype)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    axis: int | None = None,
    block_size: int | None = None,
    zero_point: torch.Tensor | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` computed in ``dtype`` (float32 by default)."""
    scale = torch.as_tensor(scale, dtype=dtype, device=q.device)
    s = _expand(scale.to(dtype), q.shape, axis, block_size, "scale")
    v = q.to(dtype)
    if zero_point is not None:
        zp = torch.as_tensor(zero_point, device=q.device).to(dtype)
        v = v - _expand(zp, q.shape, axis, block_size, "zero point")
    return v * s


# --------------------------------------------------------------------------------------------------
# fake quantization with STE + LSQ scale gradient


def lsq_grad_scale(elements_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)``: keeps scale updates on the same footing as weight updates."""
    return 1.0 / math.sqrt(max(1, elements_per_scale) * max(1, qmax))


class _FakeQuant(torch.autograd.Function):
    """``round(clamp(x/s)) * s`` with hand-written gradients.

    Hand-written because autograd through ``x / s`` gives ``0 * inf = NaN`` for the scale gradient when
    ``x / s`` overflows; here out-of-range elements contribute exactly ``qmin`` / ``qmax`` (LSQ) and in-range
    elements ``round(v) - v``. The input gradient is straight-through inside the range and zero outside.
    """

    @staticmethod
    def forward(ctx, x, s, qmin: int, qmax: int, grad_scale: float):
        v = x / s
        q = torch.clamp(torch.round(v), qmin, qmax) + 0.0  # no -0.0, as in quantize()
        ctx.save_for_backward(x, s)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return q * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x / s
        inside = (v >= qmin) & (v <= qmax)
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = torch.where(inside, grad, torch.zeros_like(grad))
        if ctx.needs_input_grad[1]:
            q = torch.clamp(torch.round(v), qmin, qmax)
            local = torch.where(inside, q - v, q)  # d(q*s)/ds: STE inside, the clamp bound outside
            gs = (grad * local * ctx.grad_scale).sum_to_size(s.shape)
        return gx, gs, None, None, None


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int = 8,
    signed: bool = True,
    axis: int | None = None,
    block_size: int | None = None,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (zero point 0), differentiable in ``x`` (STE) and ``scale`` (LSQ).

    The forward value equals ``dequantize(quantize(x, scale, ...), scale, ...)`` bit for bit.
    ``grad_scale`` defaults to LSQ's ``1 / sqrt(elements_per_scale * qmax)``. Non-positive scales are
    clamped to the smallest positive normal float so a training step that overshoots cannot yield NaN.
    """
    qmin, qmax = qrange(bits, signed)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.numel() // max(1, scale.numel()), qmax)
    scale = scale.clamp_min(torch.finfo(scale.dtype).tiny)
    s = _expand(scale, x.shape, axis, block_size, "scale")
    return _FakeQuant.apply(x, s, qmin, qmax, float(grad_scale))


# --------------------------------------------------------------------------------------------------
# timestep bins


@dataclass(frozen=True)
class TimestepBins:
    """Bins over the training-timestep range; each bin owns one row of every activation scale table.

    ``edges`` has ``G + 1`` increasing values with ``edges[0] == 0`` and ``edges[-1] ==
    num_train_timesteps``; ``group(t)`` is the ``i`` with ``edges[i] <= t < edges[i+1]``. Keying scales
    by timestep *value* (not by sampler step index) keeps one artifact valid for any sampler and step
    count. Values outside ``[0, edges[-1])`` fall into the first / last group: the rule is "number of
    interior edges ``<= t``", which is also the cheapest lookup to express in an ONNX graph.
    """

    edges: tuple[float, ...]

    def __post_init__(self):
        try:
            edges = tuple(float(e) for e in self.edges)
        except (TypeError, ValueError) as e:
            raise QuantConfigError(f"timestep edges must be numbers, got {self.edges!r}", hint="e.g. [0, 500, 1000]") from e
        object.__setattr__(self, "edges", edges)
        if len(edges) < 2:
            raise QuantConfigError(
                f"timestep edges need at least 2 values (G + 1 for G groups), got {list(edges)}",
                hint="use TimestepBins.uniform(num_groups, num_train_timesteps), e.g. edges [0, 1000] for one group",
            )
        if not all(math.isfinite(e) for e in edges):
            raise QuantConfigError(f"timestep edges must be finite, got {list(edges)}", hint="remove inf / nan edges")
        if edges[0] != 0.0:
            raise QuantConfigError(
                f"the first timestep edge must be 0, got {edges[0]}", hint="start the edges at 0, e.g. [0, 500, 1000]"
            )
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise QuantConfigError(
                f"timestep edges must be strictly increasing, got {list(edges)}",
                hint="sort the edges and remove duplicates",
            )

    @classmethod
    def uniform(cls, num_groups: int, num_train_timesteps: int = 1000) -> "TimestepBins":
        """``num_groups`` equal-width bins over ``[0, num_train_timesteps)``."""
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise QuantConfigError(f"num_groups must be a positive int, got {num_groups!r}", hint="e.g. num_groups=10")
        if not num_train_timesteps > 0:
            raise QuantConfigError(
                f"num_train_timesteps must be > 0, got {num_train_timesteps!r}",
                hint="use the scheduler's config.num_train_timesteps (usually 1000)",
            )
        n = float(num_train_timesteps)
        edges = [n * i / num_groups for i in range(num_groups)] + [n]
        return cls(tuple(edges))

    @property
    def num_groups(self) -> int:
        return len(self.edges) - 1

    @property
    def num_train_timesteps(self) -> float:
        return self.edges[-1]

    @property
    def interior_edges(self) -> tuple[float, ...]:
        """``edges[1:-1]``: ``group(t) == sum(t >= e for e in interior_edges)``."""
        return self.edges[1:-1]

    def group(self, t):
        """Group index of ``t``: a python number -> ``int``; a tensor -> ``LongTensor`` of the same shape."""
        inner = self.interior_edges
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() and torch.isnan(t).any():
                raise TimestepError("timestep is NaN", hint="pass finite timesteps in [0, num_train_timesteps)")
            if not inner:
                return torch.zeros(t.shape, dtype=torch.long, device=t.device)
            e = torch.tensor(inner, dtype=torch.float64, device=t.device)
            return (t.to(torch.float64).unsqueeze(-1) >= e).sum(-1)
        tv = float(t)
        if math.isnan(tv):
            raise TimestepError("timestep is NaN", hint="pass finite timesteps in [0, num_train_timesteps)")
        return bisect.bisect_right(inner, tv)

    def to_list(self) -> list[float]:
        return list(self.edges)
