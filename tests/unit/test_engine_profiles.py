"""Build profiles (engines/*.toml), --batch / --dim parsing, and the shape ranges they give."""

from __future__ import annotations

import pytest

from questdeploy.engine.errors import ProfileError
from questdeploy.engine.graph import TensorSig
from questdeploy.engine.profiles import (
    DimRange,
    load_profile,
    parse_dim_overrides,
    parse_range,
    profile_from_dict,
    shape_ranges,
)


@pytest.mark.parametrize("text,expected", [("1:4:8", (1, 4, 8)), ("2", (2, 2, 2)), (3, (3, 3, 3)), (" 1 : 1 : 1 ", (1, 1, 1))])
def test_parse_range(text, expected):
    r = parse_range(text)
    assert (r.min, r.opt, r.max) == expected


@pytest.mark.parametrize("text,needle", [("1:8:4", "min <= opt <= max"), ("0:1:2", ">= 1"), ("1:2", "min:opt:max"),
                                         ("a:b:c", "min:opt:max"), ("1:2:3:4", "min:opt:max"), ("-1:2:3", "min:opt:max")])
def test_parse_range_errors_say_how_to_fix(text, needle):
    with pytest.raises(ProfileError) as e:
        parse_range(text)
    assert needle in e.value.one_line() and "e.g." in e.value.one_line()


def test_dim_overrides():
    assert parse_dim_overrides(["sequence=1:4:77"]) == {"sequence": DimRange(1, 4, 77)}
    with pytest.raises(ProfileError, match="NAME=min:opt:max"):
        parse_dim_overrides(["sequence"])


@pytest.mark.parametrize("name", ["int8", "int4", "fp16"])
def test_shipped_profiles_load(name):
    p = load_profile(name)
    assert p.name == name and p.batch.min >= 1 and p.source.endswith(f"{name}.toml")
    if name == "fp16":
        assert p.form == "fp" and p.weight_bits is None and p.typing == "weak-fp16"
    else:
        assert p.form == "trt" and p.typing == "strong" and p.act_bits == 8
        assert p.weight_bits == (4 if name == "int4" else 8)


def test_profile_errors():
    with pytest.raises(ProfileError, match="unknown key"):
        profile_from_dict({"build": {"batchsize": 3}})
    with pytest.raises(ProfileError, match="no INT4 activations"):
        profile_from_dict({"onnx": {"act_bits": 4}})
    with pytest.raises(ProfileError, match="weak typing with Q/DQ"):
        profile_from_dict({"build": {"typing": "weak-fp16"}})
    with pytest.raises(ProfileError, match="no build profile"):
        load_profile("int3")


def test_overrides_and_timing_cache_template(monkeypatch, tmp_path):
    p = load_profile("int8").with_overrides(batch="2:4:16", dims={"sequence": DimRange(2, 2, 2)}, optimization_level=5)
    assert p.batch == DimRange(2, 4, 16) and p.dims["sequence"] == DimRange(2, 2, 2) and p.optimization_level == 5
    monkeypatch.setenv("QUESTDEPLOY_CACHE", str(tmp_path))
    assert p.timing_cache_path("10.8.0", "89") == tmp_path / "timing-trt10.8.0-sm89.cache"


EXPORT_IO = [
    TensorSig("sample", "float32", ("batch", 1, 16, 16)),
    TensorSig("timestep", "float32", ("timestep_len",)),
    TensorSig("encoder_hidden_states", "float32", ("batch", "sequence", 32)),
]


def test_shape_ranges_for_the_export_signature():
    p = load_profile("int8").with_overrides(batch="1:4:8", dims={"sequence": DimRange(2, 2, 2)})
    r = shape_ranges(EXPORT_IO, p)
    assert r["sample"] == ((1, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16))
    assert r["timestep"] == ((1,), (4,), (8,))  # one value or one per batch element
    assert r["encoder_hidden_states"] == ((1, 2, 32), (4, 2, 32), (8, 2, 32))


def test_static_inputs_need_no_profile_and_missing_dims_are_named():
    static = [TensorSig("sample", "float32", (1, 1, 16, 16))]
    assert shape_ranges(static, load_profile("int8")) == {}
    odd = [TensorSig("sample", "float32", ("batch", 1, "height", 16))]
    with pytest.raises(ProfileError) as e:
        shape_ranges(odd, load_profile("int8"))
    assert "--dim height=min:opt:max" in e.value.one_line()
