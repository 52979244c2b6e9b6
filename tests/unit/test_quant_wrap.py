"""quantize_unet / QuantizedUNet on tiny random UNet2DModel and UNet2DConditionModel."""

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from questdeploy.quant.attention import QuantAttnProcessor
from questdeploy.quant.errors import QuantConfigError, TimestepError, UnsupportedBitsError
from questdeploy.quant.primitives import PerAxis, PerBlock
from questdeploy.quant.quantizers import ActQuantizer, WeightQuantizer, export_hook
from questdeploy.quant.wrap import QuantConfig, QuantConv2d, QuantizedUNet, QuantLinear, quantize_unet


def tiny_unet2d():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def tiny_cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8,
    ).eval()


@pytest.fixture(scope="module", params=["unet2d", "cond"])
def model(request):
    unet = tiny_unet2d() if request.param == "unet2d" else tiny_cond_unet()
    cond = None if request.param == "unet2d" else torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return unet, x, cond


@pytest.fixture(scope="module")
def unet2d_model():
    return tiny_unet2d(), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)), None


def fp_out(unet, x, t, cond):
    with torch.no_grad():
        return (unet(x, t, cond) if cond is not None else unet(x, t)).sample


def calib_batches(cond, ts=(50, 450, 850)):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 1, 8, 8, generator=g), t, cond) for t in ts]


def test_structure_and_default_policy(model):
    unet, x, cond = model
    q = quantize_unet(unet, QuantConfig(num_groups=4))
    assert isinstance(q, QuantizedUNet) and q.unet is not unet  # deep copy by default
    layers = q.quant_layers()
    # first / last conv stay float by default (half the W8A8 error sits in conv_in's 8-bit input alone)
    assert type(q.unet.conv_in) is nn.Conv2d and type(q.unet.conv_out) is nn.Conv2d
    assert "conv_in" in q.notes["conv_in"] and q.notes["conv_out"].startswith("float")
    assert not any(n.startswith("time_embedding") for n in layers)  # timestep path stays float
    assert type(q.unet.time_embedding.linear_1) is nn.Linear
    quantized_io = quantize_unet(unet, QuantConfig(num_groups=4, keep_float=())).quant_layers()
    assert isinstance(quantized_io["conv_in"], QuantConv2d) and quantized_io["conv_in"].input_quantizer.bits == 8
    for n, lay in layers.items():
        assert isinstance(lay, (QuantConv2d, QuantLinear))
        assert lay.weight_quantizer.name == f"{n}.weight_quantizer"
        assert lay.input_quantizer.scales.shape == (4,)
    procs = q.attention_processors()
    assert procs and all(isinstance(p, QuantAttnProcessor) for p in procs.values())
    names = q.quantizers()
    assert all(names[n].name == n for n in names)
    assert any(n.endswith("processor.probs_quantizer") for n in names)
    # same parameter names as the original (plus quantizer scales)
    orig = set(unet.state_dict())
    assert orig <= {k[len("unet."):] for k in q.state_dict()}


def test_quant_disabled_is_exactly_fp(model):
    unet, x, cond = model
    q = quantize_unet(unet, QuantConfig(num_groups=2))
    ref = fp_out(unet, x, 10, cond)
    with torch.no_grad(), q.quant_enabled(False):
        assert torch.equal(q(x, 10, cond), ref)
    assert all(m.enabled for m in q.quantizers().values())  # restored


def test_w8a8_close_to_fp_after_calibration_and_backward(model):
    unet, x, cond = model
    init = "mse" if cond is not None else "minmax"  # the default (mse) once; minmax is cheaper
    q = quantize_unet(unet, QuantConfig(num_groups=3, weight_init=init, keep_float=()))
    info = q.calibrate_activations(calib_batches(cond))
    assert info["groups_seen"] == [0, 1, 2] and info["batches"] == 3
    ref = fp_out(unet, x, 50, cond)
    with torch.no_grad():
        out = q(x, 50, cond)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.15, rel
    # forward + backward in training mode: gradients reach weights and the current group's scales only
    q.train()
    q(x, torch.tensor([450, 450]), cond).square().mean().backward()
    lay = q.quant_layers()["conv_in"]
    assert lay.weight.grad is not None and torch.isfinite(lay.weight.grad).all()
    g = lay.input_quantizer.scales.grad
    assert g is not None and g[1] != 0 and g[0] == 0 and g[2] == 0
    assert all(
        p.grad is None or torch.isfinite(p.grad).all() for p in q.parameters()
    )
    q.eval()


def test_timestep_group_switching_changes_scale_used(unet2d_model):
    unet, x, cond = unet2d_model
    q = quantize_unet(unet, QuantConfig(num_groups=2, weight_init="minmax"))
    info = q.calibrate_activations(calib_batches(cond, ts=(100,)))
    assert info["groups_filled"] == [1]  # never visited: copies group 0

    def scale_group(g, factor):
        for qq in q.quantizers().values():
            if isinstance(qq, ActQuantizer):
                qq.scales.data[g] *= factor

    with torch.no_grad():
        a, b = q(x, 100, cond), q(x, 900, cond)
        assert q.timestep_group == 1
        scale_group(0, 4.0)  # group 0 only: t=900 (group 1) is unaffected, t=100 changes
        assert torch.equal(q(x, 900, cond), b)
        assert not torch.allclose(q(x, torch.tensor([100, 100]), cond), a)
        scale_group(1, 4.0)
        assert not torch.allclose(q(x, 900, cond), b)
    q.set_timestep_group(1)
    assert all(qq.group == 1 for qq in q.quantizers().values() if isinstance(qq, ActQuantizer))


def test_timestep_errors(unet2d_model):
    unet, x, cond = unet2d_model
    q = quantize_unet(unet, QuantConfig(num_groups=2))
    with pytest.raises(TimestepError) as ei:
        q(x, torch.tensor([10, 900]), cond)
    assert "share one timestep" in str(ei.value) and ei.value.hint
    with pytest.raises(TimestepError):
        q.set_timestep_group(2)
    with pytest.raises(TimestepError):
        q(x, torch.tensor([[5, 5]]), cond)


def test_export_hook_bypasses_group_lookup(model):
    unet, x, cond = model
    q = quantize_unet(unet, QuantConfig(num_groups=2))
    calls = []
    with torch.no_grad(), export_hook(lambda qq, t: calls.append(qq.name) or t):
        out = q(x, torch.tensor([10, 900]), cond)  # mixed timesteps are fine: the hook owns scales
    assert torch.allclose(out, fp_out(unet, x, torch.tensor([10, 900]), cond), atol=1e-5)
    assert set(calls) == set(q.quantizers())


def test_config_validation():
    with pytest.raises(UnsupportedBitsError) as ei:
        QuantConfig(w_bits=3)
    assert isinstance(ei.value, ValueError) and "Hint:" in str(ei.value)
    with pytest.raises(UnsupportedBitsError):
        QuantConfig(a_bits=16)
    with pytest.raises(QuantConfigError):
        QuantConfig(weight_granularity="per_block", w_bits=8)
    with pytest.raises(QuantConfigError):
        QuantConfig(weight_granularity="per_row")
    with pytest.raises(QuantConfigError):
        QuantConfig(timestep_edges=(0, 600, 500))
    with pytest.raises(UnsupportedBitsError):
        QuantConfig(w_bits=4, a_bits=4, target="trt")
    with pytest.raises(QuantConfigError):
        QuantConfig.from_dict({"w_bits": 8, "bogus": 1})
    c = QuantConfig(w_bits=4, weight_granularity="per_block", block_size=16, timestep_edges=[0, 300, 1000])
    assert QuantConfig.from_dict(c.to_dict()) == c and c.bins.num_groups == 2


def test_policy_patterns_blocks_and_weight_only():
    unet = tiny_cond_unet()
    cfg = QuantConfig(
        w_bits=4, a_bits=None, weight_granularity="per_block", block_size=32, num_groups=1,
        keep_float=("*.ff.*",), quantize_attention=True,
    )
    q = quantize_unet(unet, cfg, inplace=True)
    assert q.unet is unet
    layers = q.quant_layers()
    assert not any(".ff." in n for n in layers)
    assert all(lay.input_quantizer is None for lay in layers.values())  # weight-only
    assert not q.attention_processors()  # no activation bits -> attention stays float
    to_q = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert to_q.weight_quantizer.granularity == PerBlock(1, 32)
    to_k2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # in_features = 16
    assert layers[to_k2].weight_quantizer.granularity == PerAxis(0)
    assert "not divisible" in q.notes[f"{to_k2}.weight_quantizer"]
    assert layers["conv_in"].weight_quantizer.granularity == PerAxis(0)


def test_a4_with_8bit_first_last():
    q = quantize_unet(tiny_unet2d(), QuantConfig(w_bits=4, a_bits=4, num_groups=1, keep_float=()))
    layers = q.quant_layers()
    assert layers["conv_in"].input_quantizer.bits == 8 and layers["conv_out"].input_quantizer.bits == 8
    assert layers["down_blocks.0.resnets.0.conv1"].input_quantizer.bits == 4
    wbits = {n: m.bits for n, m in q.quantizers().items() if n.endswith("weight_quantizer")}
    assert wbits.pop("conv_in.weight_quantizer") == 8 and wbits.pop("conv_out.weight_quantizer") == 8
    assert set(wbits.values()) == {4}
    assert "8-bit weights" in q.notes["conv_in.weight_quantizer"]
    plain = quantize_unet(tiny_unet2d(), QuantConfig(w_bits=4, a_bits=4, num_groups=1, weight_8bit=(), keep_float=()))
    assert {m.bits for n, m in plain.quantizers().items() if n.endswith("weight_quantizer")} == {4}
    # a spec written before weight_8bit existed loads as "no 8-bit weight layers"
    d = QuantConfig(w_bits=4).to_dict()
    del d["weight_8bit"]
    assert QuantConfig.from_dict(d).weight_8bit == ()


def test_4bit_activations_calibrate_with_mse_clipping():
    q = quantize_unet(tiny_unet2d(), QuantConfig(w_bits=4, a_bits=4, num_groups=1))
    q.calibrate_activations(calib_batches(None))
    acts = {n: m for n, m in q.quantizers().items() if isinstance(m, ActQuantizer)}
    assert {m.observer for m in acts.values() if m.bits == 4} == {"mse"}
    assert {m.observer for m in acts.values() if m.bits == 8} == {"absmax"}
    clipped = [m for m in acts.values() if m.bits == 4 and float(m.scales[0].detach()) * m.qmax < m._stats[0][0] - 1e-6]
    assert clipped  # some 4-bit scales sit below the observed max
    with pytest.raises(QuantConfigError, match="act_observer_4bit"):
        QuantConfig(act_observer_4bit="median")
