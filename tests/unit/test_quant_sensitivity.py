"""Measured 8-bit weight selection at W4: the sensitivity score, the budgeted choice, the config."""

import pytest
import torch

from questdeploy.errors import ConfigError
from questdeploy.quest.finetune import FinetuneConfig
from questdeploy.quant.quantizers import ActQuantizer
from questdeploy.quant.sensitivity import activation_error_shares, choose_8bit_weights, weight_sensitivity
from questdeploy.quant.wrap import QuantConfig, quantize_unet

from test_quant_wrap import tiny_cond_unet


def _batches():
    g = torch.Generator().manual_seed(5)
    x, cond = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 3, 16, generator=g)
    t = torch.tensor([950, 950, 500, 500, 20, 20])  # mixed timesteps in one batch are fine: no act quantizers
    return [(x[:4], t[:4], cond[:4]), (x[4:], t[4:], cond[4:])]


def test_sensitivity_scores_every_quantized_layer_and_sees_a_damaged_one():
    fp = tiny_cond_unet()
    cfg = QuantConfig(w_bits=4, a_bits=8, num_groups=2)
    base = weight_sensitivity(fp, cfg, _batches())
    assert base and all(v >= 0.0 for v in base.values())
    assert sum(v > 0 for v in base.values()) > len(base) // 2
    # One huge weight per output channel makes that layer's per-channel 4-bit grid coarse: its score must jump.
    name = "up_blocks.1.resnets.0.conv2"
    assert name in base
    with torch.no_grad():
        w = dict(fp.named_modules())[name].weight
        w[:, 0, 0, 0] = w.abs().amax() * 40
    damaged = weight_sensitivity(fp, cfg, _batches())
    assert damaged[name] > 10 * base[name]
    assert max(damaged, key=damaged.get) == name
    # a layer the config already keeps 8-bit is not scored (nor measured)
    kept = weight_sensitivity(fp, QuantConfig(w_bits=4, a_bits=8, num_groups=2, weight_8bit=(name,)), _batches())
    assert name not in kept and set(kept) == set(damaged) - {name}


def test_choice_takes_largest_error_first_within_budget_in_model_order():
    sizes = {"a": 100, "b": 10, "c": 50, "d": 40, "e": 800}
    sens = {"a": 1.0, "b": 0.5, "c": 0.1, "d": 0.0, "e": 2.0}
    # ranked e, a, b, c; d costs nothing and is never chosen
    assert choose_8bit_weights(sens, sizes, 0.12) == ["a", "b"]  # 120 of 1000 weights: e does not fit
    assert choose_8bit_weights(sens, sizes, 0.011) == ["b"]      # nor a; b does
    assert choose_8bit_weights(sens, sizes, 0.0) == []
    assert choose_8bit_weights(sens, sizes, 0.85) == ["b", "e"]  # e first, then only b still fits
    assert choose_8bit_weights(sens, sizes, 0.999) == ["a", "b", "c", "e"]


@pytest.mark.parametrize("budget", [-0.1, 1.0, 3])
def test_bad_budget_is_a_config_error(budget):
    with pytest.raises(ConfigError, match="w8-budget"):
        FinetuneConfig(w8_budget=budget)


def _calibrated_w8a8():
    g = torch.Generator().manual_seed(7)
    x, cond = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 3, 16, generator=g)
    batches = [(x[:3], torch.full((3,), 950), cond[:3]), (x[3:], torch.full((3,), 20), cond[3:])]
    q = quantize_unet(tiny_cond_unet(), QuantConfig(w_bits=8, a_bits=8, num_groups=2))
    q.calibrate_activations(batches)
    return q.eval(), batches


def test_activation_error_shares_name_the_quantizer_that_causes_the_error():
    q, batches = _calibrated_w8a8()
    one, two = "up_blocks.1.resnets.0.conv2.input_quantizer", "down_blocks.0.resnets.0.conv1.input_quantizer"
    quantizers = q.quantizers()
    for m in quantizers.values():
        m.enabled = False
    with torch.no_grad():
        feeds = [(x, t, c, q(x, t, c)) for x, t, c in batches]  # reference: the model with every quantizer off
    quantizers[one].enabled = True
    assert activation_error_shares(q, feeds) == {one: 1.0}  # the only error there is, and only enabled ones are scored
    assert quantizers[one].enabled  # switched back on
    quantizers[two].enabled = True
    with torch.no_grad():
        quantizers[two].scales.mul_(0.02)  # a badly clipped input: it must carry nearly all of the error
    shares = activation_error_shares(q, feeds)
    assert set(shares) == {one, two} and isinstance(quantizers[two], ActQuantizer)
    assert shares[two] > 0.9 > 0.1 > shares[one]
