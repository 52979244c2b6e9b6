"""Per-group channel shifts before 4-bit input quantizers (ActQuantizer.shifts, QuantConfig.channel_shift):
what they compute, where the model gets them, and that checkpoint and ONNX export carry them exactly."""

import onnx
import pytest
import torch

from questdeploy.errors import ConfigError
from questdeploy.export import export_onnx
from questdeploy.export.testing import calibrate_random, tiny_cond_unet
from questdeploy.export.verify import per_layer_compare, quantizer_exactness
from questdeploy.quant import ActQuantizer, QuantConfig, quantize_unet
from questdeploy.quant.errors import CalibrationError, QuantConfigError, SpecMismatchError
from questdeploy.quant.spec import load_checkpoint, save_checkpoint
from questdeploy.quest.finetune import FinetuneConfig
from questdeploy.runners import make_feed

CFG = dict(w_bits=4, a_bits=4, num_groups=2, smooth_alpha=0.7, channel_shift=True)


def _silu_like(lo: float, hi: float, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """(1, 3, n) values: channel c uniform on [lo, hi] + 2c, i.e. one-sided ranges at different offsets."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(1, 3, n, generator=g)
    return x + 2.0 * torch.arange(3.0).view(1, 3, 1)


def _calibrated(q: ActQuantizer, data: dict[int, torch.Tensor]) -> ActQuantizer:
    q.observing, q.range_pass = True, True
    for g, x in data.items():
        q.group = g
        q(x)
    q.range_pass = False
    q.init_shifts()
    for g, x in data.items():
        q.group = g
        q(x)
    q.observing = False
    q.init_scales()
    return q


def test_shift_centres_each_channel_per_group_and_cuts_the_4bit_error():
    x0, x1 = _silu_like(-0.3, 4.0), _silu_like(-0.3, 4.0, seed=1) * 0.5
    shifted = _calibrated(ActQuantizer(3, 4, shift_channels=3, shift_axis=1), {0: x0, 2: x1})
    plain = _calibrated(ActQuantizer(3, 4), {0: x0, 2: x1})
    # midpoints of each channel's observed range, per group; group 1 was never seen: it copies its nearest (0)
    for g, x in ((0, x0), (2, x1)):
        want = 0.5 * (x.amin(dim=(0, 2)) + x.amax(dim=(0, 2)))
        torch.testing.assert_close(shifted.shifts[g], want)
    torch.testing.assert_close(shifted.shifts[1], shifted.shifts[0])
    for g, x in ((0, x0), (2, x1)):
        shifted.group = plain.group = g
        shifted.scales.requires_grad_(False)
        plain.scales.requires_grad_(False)
        err_shift = float(((shifted(x) - x) ** 2).mean())
        err_plain = float(((plain(x) - x) ** 2).mean())
        assert err_shift < 0.3 * err_plain, (g, err_shift, err_plain)
        # what comes out is the shift plus a value on the group's symmetric 4-bit grid
        s = float(shifted.scales[g])
        k = (shifted(x) - shifted.shifts[g].view(1, 3, 1)) / s
        torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
        assert k.round().min() >= -8 and k.round().max() <= 7


def test_shift_errors_are_clear():
    q = ActQuantizer(2, 4, shift_channels=3)
    with pytest.raises(QuantConfigError, match="3 channel shifts for an input with 5 channels"):
        q(torch.zeros(1, 5, 2, 2))
    with pytest.raises(CalibrationError, match="no channel ranges observed"):
        q.init_shifts()
    q.observing, q.range_pass = True, True
    with pytest.raises(CalibrationError, match="non-finite"):
        q(torch.tensor([[[[float("nan")]], [[0.0]], [[1.0]]]]))
    with pytest.raises(QuantConfigError, match="shift_channels"):
        ActQuantizer(2, 4, shift_channels=-1)


def _shifted_model(seed=0):
    q = quantize_unet(tiny_cond_unet(seed), QuantConfig(**CFG))
    calibrate_random(q, per_group=2)
    return q


def test_model_shifts_exactly_the_smoothed_4bit_inputs_and_calibrates_them():
    q = _shifted_model()
    shifted = {n for n, m in q.quantizers().items() if getattr(m, "shifts", None) is not None}
    expect = {f"{n}.input_quantizer" for n, m in q.quant_layers().items()
              if n.split(".")[-1] in ("conv1", "conv2", "conv_shortcut") and m.input_quantizer.bits == 4}
    assert shifted == expect and shifted
    for n in shifted:
        sh = q.quantizers()[n].shifts
        assert sh.shape[0] == 2 and torch.isfinite(sh).all() and sh.abs().max() > 0
        assert not torch.equal(sh[0], sh[1]), f"{n}: both timestep groups got the same shifts"
    # the 8-bit input quantizers of the same layers get none (a W4A8 model is unchanged by the flag)
    w4a8 = quantize_unet(tiny_cond_unet(0), QuantConfig(**{**CFG, "a_bits": 8}))
    assert all(getattr(m, "shifts", None) is None for m in w4a8.quantizers().values())


def test_channel_shift_configuration():
    assert FinetuneConfig(bits="w4a4").quant_config(1000).channel_shift is True
    assert FinetuneConfig(bits="w4a8").quant_config(1000).channel_shift is False
    assert FinetuneConfig(bits="w4a4", channel_shift=False).quant_config(1000).channel_shift is False
    with pytest.raises(ConfigError, match="no TensorRT form"):
        FinetuneConfig(bits="w4a8", target="trt", channel_shift=True)
    with pytest.raises(ConfigError, match="needs 4-bit activations"):
        FinetuneConfig(bits="w4a8", channel_shift=True)
    with pytest.raises(QuantConfigError, match="channel_shift"):
        QuantConfig(w_bits=4, a_bits=8, target="trt", channel_shift=True)


def test_checkpoint_round_trip_keeps_the_shifts_and_the_spec_names_them(tmp_path):
    q = _shifted_model()
    save_checkpoint(q, tmp_path / "ck")
    back = load_checkpoint(tiny_cond_unet(0), tmp_path / "ck")
    for n, m in q.quantizers().items():
        if getattr(m, "shifts", None) is not None:
            torch.testing.assert_close(back.quantizers()[n].shifts, m.shifts)
    entry = next(e for e in back.spec().quantizers if e.shift_channels)
    assert entry.kind == "activation" and entry.shift_axis == 1
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 4, 16, generator=g)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        torch.testing.assert_close(q(x, t, c), back(x, t, c))
    # a model built without shifts does not accept this checkpoint
    import json

    spec_path = tmp_path / "ck" / "quant_spec.json"
    d = json.loads(spec_path.read_text())
    d["config"]["channel_shift"] = False
    spec_path.write_text(json.dumps(d))
    with pytest.raises(SpecMismatchError, match="shift_channels"):
        load_checkpoint(tiny_cond_unet(0), tmp_path / "ck")


@pytest.mark.slow
def test_onnx_export_gathers_the_shift_row_of_the_timestep_group(tmp_path):
    """Sub / Add of a per-group row around each shifted Q/DQ pair; onnxruntime reproduces every quantizer."""
    q = _shifted_model()
    n_shifted = sum(getattr(m, "shifts", None) is not None for m in q.quantizers().values())
    res = export_onnx(q, tmp_path / "s.onnx", target="ort")
    m = onnx.load(str(res.path))
    ops = [n.op_type for n in m.graph.node]
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and n.name.endswith("GatherShift")]
    assert len(gathers) == n_shifted
    assert sum(n.name.endswith("SubShift") for n in m.graph.node) == n_shifted
    assert sum(n.name.endswith("AddShift") for n in m.graph.node) == n_shifted
    assert "QMarker" not in ops
    for t in (900.0, 100.0):  # both groups: the lookup must pick each group's own row
        g = torch.Generator().manual_seed(int(t))
        feed = make_feed(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([t]).numpy(),
                         torch.randn(2, 4, 16, generator=g))
        exact = quantizer_exactness(res.path, q, feed)
        assert exact and sum(r["mismatches"] for r in exact) == 0
        rows = {r["name"]: r for r in per_layer_compare(res.path, q, feed)}
        shifted = [n for n, mod in q.quantizers().items() if getattr(mod, "shifts", None) is not None]
        first = min(shifted, key=lambda n: list(rows).index(n))
        assert rows[first]["lsb_max"] <= 1.0 + 1e-3, rows[first]
