"""Input smoothing (quant/smoothing.py): float function unchanged, GPTQ sees the smoothed inputs, checkpoint
and ONNX export carry it."""

import pytest
import torch
from torch import nn

from questdeploy.errors import ConfigError
from questdeploy.export import export_onnx
from questdeploy.export.testing import calibrate_random, random_batches, tiny_cond_unet
from questdeploy.export.verify import compare_arrays, per_layer_compare
from questdeploy.quant import QuantConfig, quantize_unet
from questdeploy.quant.errors import QuantConfigError
from questdeploy.quant.gptq import HessianCollector, gptq_quantize_layers
from questdeploy.quant.smoothing import apply_smoothing, compute_smoothing
from questdeploy.quant.spec import load_checkpoint, save_checkpoint
from questdeploy.quest.finetune import SMOOTH_ALPHA_4BIT, FinetuneConfig
from questdeploy.runners import OnnxRuntimeRunner, TorchRunner, make_feed

CFG = dict(w_bits=4, a_bits=4, num_groups=2, smooth_alpha=0.7)


def _smoothed(seed=0):
    fp = tiny_cond_unet(seed)
    q = quantize_unet(fp, QuantConfig(**CFG))
    s = compute_smoothing(fp, random_batches(q, [900.0, 100.0], 2, 4), q.quant_config.smooth_layers, 0.7)
    apply_smoothing(q.unet, s)
    return fp, q, s


def _call(model, x, t, c):
    out = model(x, t, encoder_hidden_states=c)
    return out.sample if hasattr(out, "sample") else out


def test_smoothing_keeps_the_float_function_and_is_not_trivial():
    fp, q, s = _smoothed()
    assert s and all(n.split(".")[-1] in ("conv1", "conv2", "conv_shortcut") for n in s)
    assert max(float(v.max() / v.min()) for v in s.values()) > 1.5, "factors are all ~1: nothing migrated"
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 4, 16, generator=g)
    t = torch.full((2,), 500.0)
    with torch.no_grad(), q.quant_enabled(False):
        torch.testing.assert_close(_call(q, x, t, c), _call(fp, x, t, c), rtol=1e-4, atol=1e-5)


def test_gptq_hessian_is_that_of_the_smoothed_inputs(monkeypatch):
    """Hessians collected on the FP layer, then transformed, equal those of the inputs the smoothed layer sees."""
    import questdeploy.quant.gptq as G

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(3, 6, 5, 5) * torch.tensor([1.0, 8.0, 0.5, 3.0, 1.0, 20.0]).view(1, -1, 1, 1)
    s = torch.tensor([1.0, 4.0, 0.7, 2.0, 1.0, 6.0])
    with HessianCollector({"c": conv}) as hc:
        conv(x / s.view(1, -1, 1, 1))
    expected = (hc.hessians["c"] / hc.rows["c"]).double()
    fp = nn.Sequential(conv)
    q = quantize_unet(fp, QuantConfig(w_bits=4, a_bits=4, num_groups=1, smooth_alpha=0.5, smooth_layers=("0",)))
    apply_smoothing(q.unet, {"0": s})
    q.init_weight_scales()
    seen = []
    orig = G.gptq_round
    monkeypatch.setattr(G, "gptq_round", lambda w, wq, H, **k: (seen.append(H.clone()), orig(w, wq, H, **k))[1])
    gptq_quantize_layers(fp, q.quant_layers(), [lambda: fp(x)])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-6)  # x / s was rounded to float32


def test_checkpoint_round_trip_keeps_the_smoothing(tmp_path):
    fp, q, _ = _smoothed()
    q.init_weight_scales()
    calibrate_random(q)
    save_checkpoint(q, tmp_path / "ck")
    back = load_checkpoint(tiny_cond_unet(0), tmp_path / "ck")
    assert back.quant_config.smooth_alpha == 0.7
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 4, 16, generator=g)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        torch.testing.assert_close(q(x, t, c), back(x, t, c))


@pytest.mark.slow
def test_onnx_export_carries_the_smoothing(tmp_path):
    """The per-channel division is in the graph: the first quantizers agree with PyTorch to 1 LSB."""
    import onnx

    _, q, smoothing = _smoothed()
    q.init_weight_scales()
    calibrate_random(q)
    res = export_onnx(q, tmp_path / "s.onnx", target="ort")
    m = onnx.load(str(res.path))
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    divs = [n for n in m.graph.node if n.op_type == "Div" and len(inits.get(n.input[1], [])) == 4]
    assert sorted(inits[n.input[1]][1] for n in divs) == sorted(v.numel() for v in smoothing.values())
    g = torch.Generator().manual_seed(3)
    feed = make_feed(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([600.0]).numpy(), torch.randn(2, 4, 16, generator=g))
    a, b = TorchRunner(q).infer(feed)["out_sample"], OnnxRuntimeRunner(res.path).infer(feed)["out_sample"]
    assert compare_arrays(a, b)["rel_l2"] < 0.5
    rows = per_layer_compare(res.path, q, feed)
    first = next((r for r in rows if r["lsb_mismatch_frac"] > 0), None)
    assert first is None or (first["lsb_max"] <= 1.0 + 1e-3 and first["lsb_mismatch_frac"] <= 5e-3), first


def test_smoothing_configuration():
    assert FinetuneConfig(bits="w4a4").smooth_alpha == SMOOTH_ALPHA_4BIT
    assert FinetuneConfig(bits="w4a8").smooth_alpha == 0.0
    assert FinetuneConfig(bits="w4a8").quant_config(1000).smooth_alpha is None
    assert FinetuneConfig(bits="w4a4", smooth_alpha=0).quant_config(1000).smooth_alpha is None
    with pytest.raises(ConfigError, match="--smooth-alpha"):
        FinetuneConfig(smooth_alpha=1.5)
    with pytest.raises(QuantConfigError, match="smooth_alpha"):
        QuantConfig(smooth_alpha=0.0)
