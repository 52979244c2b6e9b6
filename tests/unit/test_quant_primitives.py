"""Pure quantization math: ranges, rounding, clamping, granularity, STE/LSQ gradients, timestep bins."""

import math

import pytest
import torch

from questdeploy.quant.errors import QuantConfigError, QuantError, ScaleShapeError, TimestepError, UnsupportedBitsError
from questdeploy.quant.primitives import (
    PerAxis,
    PerBlock,
    PerTensor,
    TimestepBins,
    dequantize,
    fake_quant,
    granularity_from_dict,
    qrange,
    quantize,
)


@pytest.mark.parametrize(
    "bits,signed,expected", [(8, True, (-128, 127)), (8, False, (0, 255)), (4, True, (-8, 7)), (4, False, (0, 15))]
)
def test_qrange(bits, signed, expected):
    assert qrange(bits, signed) == expected


@pytest.mark.parametrize("bits", [0, 1, 17, 3.0, True, "8"])
def test_qrange_rejects_bad_bits(bits):
    with pytest.raises(UnsupportedBitsError) as ei:
        qrange(bits, True)
    assert ei.value.hint and isinstance(ei.value, ValueError)


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_round_trip_and_clamp_per_tensor(bits, signed):
    qmin, qmax = qrange(bits, signed)
    scale = torch.tensor(0.5)
    grid = torch.arange(qmin, qmax + 1, dtype=torch.float32) * scale
    # values on the grid round-trip exactly
    q = quantize(grid, scale, bits, signed)
    assert torch.equal(q, torch.arange(qmin, qmax + 1, dtype=torch.float32))
    assert torch.equal(dequantize(q, scale), grid)
    # values beyond the range saturate
    far = torch.tensor([-1e6, (qmin - 3) * 0.5, (qmax + 3) * 0.5, 1e6, float("inf"), -float("inf")])
    q = quantize(far, scale, bits, signed)
    assert torch.equal(q, torch.tensor([qmin, qmin, qmax, qmax, qmax, qmin], dtype=torch.float32))


def test_round_half_to_even_like_onnx():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997])
    assert quantize(x, 1.0, 8, True).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0]


def test_zero_point_rounds_before_adding():
    # ONNX: saturate(round(x / s) + zp); round(2.5) = 2, so 2 + 128 = 130 (not round(130.5) = 130 either way)
    x = torch.tensor([2.5, 3.5, 1000.0, -1000.0])
    q = quantize(x, 1.0, 8, False, zero_point=128)
    assert q.tolist() == [130.0, 132.0, 255.0, 0.0]
    assert dequantize(q, 1.0, zero_point=128).tolist() == [2.0, 4.0, 127.0, -128.0]


def test_out_dtype_int8():
    q = quantize(torch.tensor([1.0, -300.0]), 0.5, 8, True, out_dtype=torch.int8)
    assert q.dtype == torch.int8 and q.tolist() == [2, -128]


def test_per_channel():
    x = torch.tensor([[1.0, -2.0, 3.0], [10.0, -20.0, 30.0]])
    scale = torch.tensor([1.0, 10.0])
    q = quantize(x, scale, 8, True, axis=0)
    assert q.tolist() == [[1, -2, 3], [1, -2, 3]]
    assert torch.equal(dequantize(q, scale, axis=0), x)
    # axis 1 of a 4-D tensor (NCHW activations / conv weights per output channel)
    x4 = torch.randn(2, 3, 4, 4)
    s3 = torch.tensor([0.1, 0.2, 0.3])
    expect = torch.clamp(torch.round(x4 / s3.view(1, 3, 1, 1)), -128, 127)
    assert torch.equal(quantize(x4, s3, 8, True, axis=1), expect)


def test_per_block_matches_manual_and_ragged_last_block():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    scale = torch.rand(3, 2) + 0.1
    q = quantize(x, scale, 4, True, axis=1, block_size=4)
    manual = torch.clamp(torch.round(x / scale.repeat_interleave(4, dim=1)), -8, 7)
    assert torch.equal(q, manual)
    assert torch.equal(dequantize(q, scale, axis=1, block_size=4), manual * scale.repeat_interleave(4, dim=1))
    # ragged: 10 columns, block 4 -> 3 blocks (ONNX allows it)
    x = torch.randn(2, 10)
    s = torch.rand(2, 3) + 0.1
    q = quantize(x, s, 8, True, axis=1, block_size=4)
    assert torch.equal(q, torch.clamp(torch.round(x / s.repeat_interleave(4, dim=1)[:, :10]), -128, 127))


@pytest.mark.parametrize(
    "shape,scale_shape,kw",
    [
        ((2, 3), (3,), {"axis": 0}),
        ((2, 3), (2,), {}),
        ((2, 8), (2, 3), {"axis": 1, "block_size": 4}),
        ((2, 8), (2,), {"axis": 1, "block_size": 4}),
        ((2, 8), (2, 2), {"block_size": 4}),
        ((2, 8), (2,), {"axis": 5}),
    ],
)
def test_scale_shape_errors_have_hints(shape, scale_shape, kw):
    with pytest.raises(ScaleShapeError) as ei:
        quantize(torch.zeros(shape), torch.ones(scale_shape), 8, True, **kw)
    assert ei.value.hint


def test_fake_quant_equals_dequant_of_quant():
    torch.manual_seed(0)
    x = torch.randn(4, 16) * 3
    s = torch.rand(4, 4) + 0.05
    for kw in ({}, {"axis": 0}, {"axis": 1, "block_size": 4}):
        sc = s[0, 0] if not kw else (s[:, 0] if "block_size" not in kw else s)
        y = fake_quant(x, sc, 4, True, **kw)
        assert torch.equal(y, dequantize(quantize(x, sc, 4, True, **kw), sc, **kw))


def test_ste_and_lsq_gradients():
    s = torch.tensor(1.0, requires_grad=True)
    x = torch.tensor([0.3, 1.6, -2.4, 200.0, -300.0], requires_grad=True)
    y = fake_quant(x, s, 8, True, grad_scale=1.0)
    y.sum().backward()
    # straight-through inside the range, zero outside
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    # LSQ: inside round(v) - v, outside the clamp bound
    expected = (0 - 0.3) + (2 - 1.6) + (-2 + 2.4) + 127 + (-128)
    assert s.grad.item() == pytest.approx(expected, abs=1e-5)


def test_lsq_scale_gradient_sign_on_clipping():
    # all values clipped at qmax: increasing the scale reduces the error -> loss gradient wrt s is negative
    x = torch.full((10,), 10.0)
    s = torch.tensor(0.01, requires_grad=True)
    loss = ((fake_quant(x, s, 8, True) - x) ** 2).sum()
    loss.backward()
    assert torch.isfinite(s.grad) and s.grad.item() < 0
    # inside the range: x = 0.7, s = 1 -> y = 1 overshoots; LSQ says d y / d s = round(v) - v = 0.3 > 0,
    # so the loss gradient is positive (shrinking the scale helps)
    x = torch.tensor([0.7])
    s = torch.tensor(1.0, requires_grad=True)
    ((fake_quant(x, s, 8, True, grad_scale=1.0) - x) ** 2).sum().backward()
    assert s.grad.item() == pytest.approx(2 * 0.3 * 0.3, rel=1e-5)


def test_lsq_default_grad_scale_and_per_channel_grad_shape():
    x = torch.randn(4, 8)
    s = torch.full((4,), 0.1, requires_grad=True)
    fake_quant(x, s, 8, True, axis=0).sum().backward()
    assert s.grad.shape == (4,) and torch.isfinite(s.grad).all()
    s2 = torch.full((4, 2), 0.1, requires_grad=True)
    fake_quant(x, s2, 4, True, axis=1, block_size=4).sum().backward()
    assert s2.grad.shape == (4, 2) and torch.isfinite(s2.grad).all()


def test_no_nan_gradient_on_overflow():
    x = torch.tensor([3e38, -3e38, 1.0], requires_grad=True)
    s = torch.tensor(1e-30, requires_grad=True)
    y = fake_quant(x, s, 8, True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(s.grad).all()


def test_granularity_objects():
    assert PerTensor().kwargs() == {"axis": None, "block_size": None}
    assert PerAxis(0).scale_shape((5, 3, 3, 3)) == (5,)
    assert PerBlock(1, 4).scale_shape((6, 10)) == (6, 3)
    for g in (PerTensor(), PerAxis(0), PerBlock(1, 32)):
        assert granularity_from_dict(g.to_dict()) == g
    with pytest.raises(QuantConfigError):
        PerBlock(1, 0)
    with pytest.raises(QuantConfigError):
        granularity_from_dict({"granularity": "per_row"})


def test_timestep_bins_group():
    bins = TimestepBins.uniform(4, 1000)
    assert bins.edges == (0.0, 250.0, 500.0, 750.0, 1000.0) and bins.num_groups == 4
    assert [bins.group(t) for t in (0, 249.9, 250, 999, 1000, 5000, -3)] == [0, 0, 1, 3, 3, 3, 0]
    t = torch.tensor([0, 250, 999, 500])
    g = bins.group(t)
    assert g.dtype == torch.long and g.tolist() == [0, 1, 3, 2]
    assert TimestepBins((0, 1000)).group(torch.tensor(7.0)).item() == 0
    assert TimestepBins([0, 10, 1000]).edges == (0.0, 10.0, 1000.0)
    with pytest.raises(TimestepError):
        bins.group(float("nan"))


@pytest.mark.parametrize("edges", [(0,), (1, 1000), (0, 500, 500, 1000), (0, float("inf")), ("a", 1)])
def test_timestep_bins_validation(edges):
    with pytest.raises(QuantConfigError) as ei:
        TimestepBins(edges)
    assert "Hint:" in str(ei.value)


def test_timestep_bins_uniform_validation():
    with pytest.raises(QuantError):
        TimestepBins.uniform(0)
    with pytest.raises(QuantError):
        TimestepBins.uniform(3, 0)
    assert math.isclose(TimestepBins.uniform(3, 1000).edges[1], 1000 / 3)
