"""GPTQ weight rounding: stays on the quantizer's grid and lowers the layer *output* error vs RTN."""

import pytest
import torch
from torch import nn

from questdeploy.quant.gptq import HessianCollector, gptq_quantize_layers, gptq_round
from questdeploy.quant.primitives import PerAxis, PerBlock
from questdeploy.quant.quantizers import WeightQuantizer
from questdeploy.quant.wrap import QuantConfig, quantize_unet

from test_quant_wrap import tiny_cond_unet


def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d) * 0.3
    scale = torch.logspace(-1, 1, d)  # very uneven channel energies, like real activations
    return (torch.randn(n, d, generator=g) @ mix) * scale


def output_error(w_hat, w, x):
    return float(((x @ (w_hat - w).detach().T) ** 2).mean())


@pytest.mark.parametrize("gran", [PerAxis(0), PerBlock(1, 16)])
def test_gptq_on_grid_and_beats_nearest_on_output_error(gran):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = correlated_inputs(2048, 64)
    wq = WeightQuantizer(w.shape, bits=4, granularity=gran).init_from(w)
    new = gptq_round(w, wq, x.T @ x / len(x))
    # on the grid: quantizing again changes nothing, integers within [-8, 7]
    assert torch.allclose(wq(new), new, atol=1e-6)
    q = wq.int_weight(new)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    rtn = wq(w)
    assert not torch.equal(new, rtn)
    assert output_error(new, w, x) < 0.8 * output_error(rtn, w, x)


def test_gptq_dead_columns_and_shape_mismatch():
    w = torch.randn(8, 16)
    x = correlated_inputs(512, 16)
    x[:, 3] = 0.0  # a channel that never fires
    wq = WeightQuantizer(w.shape, bits=4).init_from(w)
    new = gptq_round(w, wq, x.T @ x / len(x), act_order=False)
    assert torch.isfinite(new).all()
    assert torch.equal(new[:, 3], wq(w)[:, 3])  # nothing to compensate it with: nearest rounding
    with pytest.raises(ValueError, match="hessian"):
        gptq_round(w, wq, torch.eye(15))


def test_hessian_collector_conv_matches_unfold():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    with HessianCollector({"c": conv}) as hc:
        conv(x)
    cols = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27).double()
    assert hc.rows["c"] == 2 * 25
    assert torch.allclose(hc.hessians["c"], cols.T @ cols)
    assert not conv._forward_pre_hooks  # hooks removed on exit


def test_gptq_quantize_layers_on_tiny_unet():
    fp = tiny_cond_unet()
    q = quantize_unet(fp, QuantConfig(w_bits=4, a_bits=8, num_groups=2))
    q.init_weight_scales()
    before = {n: l.weight.detach().clone() for n, l in q.quant_layers().items()}
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 3, 16, generator=g)
    gains = gptq_quantize_layers(fp, q.quant_layers(), [lambda: fp(x, torch.tensor([500] * 4), encoder_hidden_states=cond)])
    assert set(gains) == {n for n, l in q.quant_layers().items() if l.weight_quantizer is not None}
    assert all(0.0 <= v < 1.0 for v in gains.values())
    assert sum(v > 0 for v in gains.values()) > len(gains) // 2
    changed = [n for n, l in q.quant_layers().items() if not torch.equal(l.weight, before[n])]
    assert changed
    for n in changed:  # every changed weight sits exactly on its quantizer's grid
        layer = q.quant_layers()[n]
        assert torch.allclose(layer.weight_quantizer(layer.weight), layer.weight, atol=1e-6)
    assert not any(m._forward_pre_hooks for m in fp.modules())
