"""QuantSpec JSON round-trip, validation, mismatch detection, checkpoint save/load."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from questdeploy.quant.errors import SpecError, SpecMismatchError
from questdeploy.quant.spec import SPEC_FILE, WEIGHTS_FILE, QuantSpec, load_checkpoint, save_checkpoint
from questdeploy.quant.wrap import QuantConfig, quantize_unet


def tiny(channels=(32, 64)):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


@pytest.fixture(scope="module")
def calibrated():
    unet = tiny()
    q = quantize_unet(unet, QuantConfig(w_bits=4, a_bits=8, num_groups=2, weight_init="minmax", keep_float=()))
    g = torch.Generator().manual_seed(0)
    q.calibrate_activations([(torch.randn(1, 1, 8, 8, generator=g), t, None) for t in (100, 700)])
    return unet, q


def test_spec_json_round_trip(calibrated):
    _, q = calibrated
    spec = q.spec(meta={"seed": 0})
    again = QuantSpec.from_json(spec.to_json())
    assert again == spec
    assert spec.version == 1 and spec.w_bits == 4 and spec.a_bits == 8 and spec.timestep_edges == [0.0, 500.0, 1000.0]
    byname = spec.by_name()
    assert set(byname) == set(q.quantizers())
    w = byname["conv_in.weight_quantizer"]
    assert (w.kind, w.bits, w.signed, w.granularity, w.axis, w.layer, w.role) == (
        "weight", 8, True, "per_channel", 0, "conv_in", "weight"
    )
    a = byname["conv_in.input_quantizer"]
    assert a.kind == "activation" and a.bits == 8 and a.shape == [2] and len(a.scales) == 2
    assert a.scales == q.quantizers()["conv_in.input_quantizer"].scales.tolist()
    probs = next(e for e in spec.quantizers if e.role == "attn_probs")
    assert probs.signed is False and probs.layer.endswith("attentions.0")
    assert "time_embedding.linear_1" in spec.float_layers


def test_spec_validation_messages(calibrated):
    _, q = calibrated
    d = json.loads(q.spec().to_json())
    bad = dict(d, version=99)
    with pytest.raises(SpecError, match="newer"):
        QuantSpec.from_dict(bad)
    bad = dict(d, extra_field=1)
    with pytest.raises(SpecError) as ei:
        QuantSpec.from_dict(bad)
    assert ei.value.hint
    bad = json.loads(json.dumps(d))
    bad["quantizers"][1]["scales"] = [1.0]
    with pytest.raises(SpecError, match="scale table"):
        QuantSpec.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["quantizers"][0]["bits"] = 3
    with pytest.raises(SpecError):
        QuantSpec.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["quantizers"][1]["scales"][0] = -1.0
    with pytest.raises(SpecError, match="> 0"):
        QuantSpec.from_dict(bad)
    bad = dict(d)
    del bad["config"]
    with pytest.raises(SpecError, match="incomplete"):
        QuantSpec.from_dict(bad)
    with pytest.raises(SpecError):
        QuantSpec.from_json("{not json")


def test_spec_mismatch_detected(calibrated):
    _, q = calibrated
    spec = q.spec()
    spec.check_matches(q)  # matches itself
    other = quantize_unet(tiny(), QuantConfig(w_bits=8, a_bits=8, num_groups=2))  # different bits
    with pytest.raises(SpecMismatchError, match="bits"):
        spec.check_matches(other)
    other = quantize_unet(tiny(), QuantConfig(w_bits=4, a_bits=8, num_groups=2, quantize_attention=False))
    with pytest.raises(SpecMismatchError, match="in the spec but not in the model") as ei:
        spec.check_matches(other)
    assert ei.value.hint
    other = quantize_unet(tiny((16, 32)), QuantConfig(w_bits=4, a_bits=8, num_groups=2))
    with pytest.raises(SpecMismatchError, match="shape"):
        spec.check_matches(other)


def test_checkpoint_save_load_round_trip(calibrated, tmp_path):
    unet, q = calibrated
    with torch.no_grad():
        q.unet.conv_in.weight.add_(0.01)  # pretend finetuning changed a weight
    q.quantizers()["conv_out.input_quantizer"].enabled = False
    folder = save_checkpoint(q, tmp_path / "checkpoint", extra_meta={"stage": "finetune"})
    assert sorted(p.name for p in folder.iterdir()) == sorted([SPEC_FILE, WEIGHTS_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded = load_checkpoint(tiny(), folder)
    assert QuantSpec.load(folder / SPEC_FILE).meta == {"stage": "finetune"}
    assert loaded.quantizers()["conv_out.input_quantizer"].enabled is False
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 600), q(x, 600))
    # overwrite an existing checkpoint atomically
    save_checkpoint(q, folder)
    assert QuantSpec.load(folder / SPEC_FILE).meta == {}
    q.quantizers()["conv_out.input_quantizer"].enabled = True


def test_checkpoint_onto_wrong_model(calibrated, tmp_path):
    _, q = calibrated
    folder = save_checkpoint(q, tmp_path / "ck")
    with pytest.raises(SpecMismatchError):
        load_checkpoint(tiny((16, 32)), folder)
    with pytest.raises(SpecError, match="no quant spec"):
        load_checkpoint(tiny(), tmp_path / "missing")
