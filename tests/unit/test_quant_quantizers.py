"""Quantizer modules: weight init, integer weights, group switching, observers, export hook."""

import pytest
import torch

from questdeploy.quant.errors import CalibrationError, QuantConfigError, UnsupportedBitsError
from questdeploy.quant.primitives import PerAxis, PerBlock, PerTensor, dequantize, quantize
from questdeploy.quant.quantizers import ActQuantizer, WeightQuantizer, clipping_errors, export_hook, weight_granularity_for


def _lp_err(wq, w, p=2.4):
    with torch.no_grad():
        return (wq(w) - w).abs().pow(p).sum().item()


def test_weight_mse_init_beats_minmax_on_outliers():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, 0] = 20.0  # one outlier per channel
    q = WeightQuantizer(w.shape, bits=4)
    err_minmax = _lp_err(q.init_from(w, "minmax"), w)
    s_minmax = q.scale.detach().clone()
    err_mse = _lp_err(q.init_from(w, "mse"), w)
    assert err_mse < err_minmax
    assert (q.scale <= s_minmax + 1e-7).all()  # search only shrinks the range


def test_weight_per_channel_conv_and_int_weight():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    q = WeightQuantizer(w.shape, bits=8).init_from(w, "minmax")
    assert q.scale.shape == (6,)
    iw = q.int_weight(w)
    assert iw.dtype == torch.int8 and iw.int().abs().max() <= 127
    # fake-quant == DQ(int weight)
    assert torch.equal(q(w), dequantize(iw, q.scale.detach(), axis=0))
    assert iw.view(6, -1).abs().amax(dim=1).tolist() == [127] * 6  # minmax: the absmax hits qmax


def test_weight_per_block_int4():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = WeightQuantizer(w.shape, bits=4, granularity=PerBlock(1, 16)).init_from(w)
    assert q.scale.shape == (4, 4)
    iw = q.int_weight(w)
    assert iw.min() >= -8 and iw.max() <= 7
    assert torch.equal(q(w), dequantize(iw, q.scale.detach(), axis=1, block_size=16))


def test_weight_quantizer_validation():
    with pytest.raises(UnsupportedBitsError):
        WeightQuantizer((4, 4), bits=3)
    with pytest.raises(QuantConfigError):
        WeightQuantizer((4, 10), bits=4, granularity=PerBlock(1, 4))  # does not divide
    with pytest.raises(QuantConfigError):
        WeightQuantizer((4, 8, 3, 3), bits=4, granularity=PerBlock(1, 4))  # conv
    with pytest.raises(QuantConfigError):
        WeightQuantizer((4, 8), bits=8, granularity=PerTensor())
    with pytest.raises(QuantConfigError):
        WeightQuantizer((4, 8)).init_from(torch.zeros(4, 9))


def test_weight_granularity_fallback_reasons():
    assert weight_granularity_for((8, 64), True, 32) == (PerBlock(1, 32), None)
    g, why = weight_granularity_for((8, 48), True, 32)
    assert g == PerAxis(0) and "not divisible" in why
    g, why = weight_granularity_for((8, 4, 3, 3), True, 32)
    assert g == PerAxis(0) and "Linear" in why
    assert weight_granularity_for((8, 48), False, 32) == (PerAxis(0), None)


def test_act_group_switching_changes_scale():
    q = ActQuantizer(num_groups=3, bits=8)
    q.scales.data = torch.tensor([0.01, 0.1, 1.0])
    x = torch.tensor([0.5, 3.0])
    outs = []
    for g in range(3):
        q.group = g
        outs.append(q(x))
    assert torch.equal(outs[0], torch.tensor([0.5, 1.27]))  # clipped at 127 * 0.01
    assert torch.equal(outs[1], torch.tensor([0.5, 3.0]))
    assert torch.equal(outs[2], torch.tensor([0.0, 3.0]))  # round(0.5) = 0 (half to even)
    with pytest.raises(QuantConfigError):
        q.group = 3


def test_act_scale_gradient_only_for_current_group():
    q = ActQuantizer(num_groups=2)
    q.scales.data.fill_(0.01)
    q.group = 1
    q(torch.full((4,), 5.0)).sum().backward()
    assert q.scales.grad[0] == 0 and q.scales.grad[1] != 0


def test_act_unsigned_for_probs():
    q = ActQuantizer(bits=8, signed=False)
    q.scales.data.fill_(1 / 255)
    p = torch.tensor([-0.1, 0.0, 0.5, 1.0, 2.0])
    y = q(p).detach()
    assert y[0] == 0 and y[-1] == pytest.approx(1.0) and y[3] == pytest.approx(1.0)
    assert ActQuantizer(bits=16, signed=False, allowed_bits=(8, 16)).qmax == 65535
    with pytest.raises(UnsupportedBitsError):
        ActQuantizer(bits=16)


def test_act_observe_absmax_percentile_and_fill():
    q = ActQuantizer(num_groups=4, bits=8)
    q.observing = True
    q.group = 1
    assert torch.equal(q(torch.tensor([1.0, -2.54])), torch.tensor([1.0, -2.54]))  # pass-through
    q(torch.tensor([0.5]))
    q.group = 3
    q(torch.tensor([12.7]))
    filled = q.init_scales()
    assert filled == [0, 2]
    assert q.scales.tolist() == pytest.approx([0.02, 0.02, 0.02, 0.1])  # group 2 ties -> lower neighbour
    p = ActQuantizer(observer="percentile", percentile=0.5)
    p.observe(torch.tensor([1.0, 2.0, 3.0, 100.0]))
    p.observe(torch.tensor([3.0, 4.0, 5.0, 100.0]))
    p.init_scales()
    assert p.scales[0].item() == pytest.approx(3.0 / 127)  # mean of per-batch medians (2, 4)
    e = ActQuantizer(momentum=0.5)
    e.observe(torch.tensor([2.0]))
    e.observe(torch.tensor([4.0]))
    e.init_scales()
    assert e.scales[0].item() == pytest.approx(3.0 / 127)
    with pytest.raises(CalibrationError):
        ActQuantizer().init_scales()


def test_act_mse_observer_clips_outliers_at_4_bits():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 8, 16, 16, generator=g) for _ in range(3)]
    batches[1][0, 0, 0, 0] = 40.0  # one rare outlier
    errs = {}
    for obs in ("absmax", "mse"):
        q = ActQuantizer(num_groups=2, bits=4, observer=obs)
        q.observing = True
        for b in batches:
            q(b)
        q.observing = False
        assert q.init_scales() == [1]  # group 1 never observed: copied from group 0
        with torch.no_grad():
            errs[obs] = (float(q.scales[0]), sum(float(((q(b) - b) ** 2).mean()) for b in batches))
        assert q.scales[1] == q.scales[0]
    assert errs["mse"][0] < 0.5 * errs["absmax"][0]  # clips the outlier instead of spending the range on it
    assert errs["mse"][1] < 0.5 * errs["absmax"][1]
    q = ActQuantizer(bits=4, observer="mse")
    q.observing = True
    for _ in range(20):
        q(torch.randn(64, 64, 32, generator=g))
    assert q._samples[0].numel() <= 2 * ActQuantizer.MSE_SAMPLES  # memory stays bounded
    one = ActQuantizer(bits=4, observer="mse")
    one.observing = True
    one(torch.randn(64, 64, 32, 32, generator=g))  # a group seen once keeps a sample, not the 16 MB batch
    assert one._samples[0].untyped_storage().nbytes() <= 4 * 2 * ActQuantizer.MSE_SAMPLES
    q.reset_observations()
    assert not q._samples


@pytest.mark.parametrize("signed", [True, False])
def test_act_observer_statistics_skip_non_finite_values(signed):
    """The one-pass statistic of all-finite batches and the filtering path for batches with inf / NaN agree
    on the finite values, and the kept MSE sample holds only finite values."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, 8, generator=g) * 3
    bad = x.clone()
    bad[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    finite = bad[torch.isfinite(bad)]
    expect = float(finite.abs().max() if signed else finite.clamp_min(0).max())
    q = ActQuantizer(bits=4, observer="mse", signed=signed)
    assert q._batch_stat(bad) == (expect, False)
    assert q._batch_stat(x) == (float(x.abs().max() if signed else x.clamp_min(0).max()), True)
    q.observing = True
    q(bad)
    assert torch.isfinite(q._samples[0]).all() and q._stats[0][0] == expect


@pytest.mark.parametrize("bits", [4, 8])
def test_act_mse_clip_search_finds_the_full_scans_ratio(bits):
    """The coarse-to-fine search returns the ratio a scan of all 100 candidates returns, on shapes that
    activations take: Gaussian, one-sided (after SiLU), heavy-tailed, a few outliers, a narrow spike."""
    g = torch.Generator().manual_seed(1)
    n = 8192
    samples = [torch.randn(n, generator=g), torch.nn.functional.silu(3 * torch.randn(n, generator=g)),
               torch.randn(n, generator=g) / (torch.rand(n, generator=g) + 0.02),  # heavy tails
               torch.randn(n, generator=g) * 0.1,
               torch.cat([torch.randn(n, generator=g), torch.tensor([30.0, -25.0])])]
    samples[3][:5] = 8.0
    q = ActQuantizer(bits=bits)
    ratios = torch.linspace(1.0, 0.05, 100)
    for v in samples:
        amax = float(v.abs().max())
        full = clipping_errors(v[None], torch.tensor([amax]), ratios[:, None], q.qmin, q.qmax, 2.0)[:, 0]
        assert q._mse_ratio(v, amax) == float(ratios[int(torch.argmin(full))])
    assert q._mse_ratio(torch.zeros(0), 1.0) == 1.0


def test_export_hook_replaces_forward_and_nests():
    wq = WeightQuantizer((2, 4))
    aq = ActQuantizer()
    aq.enabled = False
    seen = []

    def hook(q, x):
        seen.append(type(q).__name__)
        return x * 0 + 7

    x = torch.ones(2, 4)
    with export_hook(hook):
        assert (wq(x) == 7).all() and (aq(x) == 7).all()  # called for disabled quantizers too
        with export_hook(lambda q, x: x + 1):
            assert (aq(x) == 2).all()
        assert (aq(x) == 7).all()
    assert seen == ["WeightQuantizer", "ActQuantizer", "ActQuantizer"]
    assert torch.equal(aq(x), x)  # hook gone, disabled -> identity


def test_quantizer_matches_primitive_bitwise():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 5)
    q = ActQuantizer(bits=4)
    q.scales.data.fill_(0.3)
    s = torch.tensor(0.3)
    assert torch.equal(q(x), dequantize(quantize(x, s, 4, True), s))


def test_frozen_weight_returns_the_same_fake_quant_once_and_clears_on_exit():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    wq = WeightQuantizer(w.shape, bits=4)
    wq.init_from(w)
    expected = wq(w)
    with wq.frozen(w):
        cached = wq(w)
        assert torch.equal(cached, expected)
        assert wq(torch.zeros_like(w)) is cached  # the cache answers, whatever is passed in
        assert not cached.requires_grad
    assert torch.equal(wq(torch.zeros_like(w)), torch.zeros_like(w))  # cleared: quantizes its input again
