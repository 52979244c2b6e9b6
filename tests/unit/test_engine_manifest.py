"""engine.json (round trip, refusal of engines built for another GPU / TensorRT) and the Triton repository."""

from __future__ import annotations

import json

import onnx
import pytest

from _trt_graphs import unet_like
from questdeploy.engine import manifest as M
from questdeploy.engine import triton as T
from questdeploy.engine.errors import EngineError, EngineIncompatibleError
from questdeploy.engine.graph import io_signature

BUILD_INFO = {
    "tensorrt_version": "10.8.0.43", "gpu": "NVIDIA L4", "compute_capability": "8.9", "build_seconds": 12.5,
    "flags": {"strongly_typed": True, "fp16": False, "optimization_level": 3, "workspace_mib": 4096, "timing_cache": None,
              "refit": "none", "strip_weights": False,
              "shapes": {"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8]], "timestep": [[1], [2], [4]],
                         "encoder_hidden_states": [[1, 1, 16], [2, 4, 16], [4, 8, 16]]}},
}


@pytest.fixture()
def built(tmp_path):
    onnx_path = tmp_path / "unet_trt.onnx"
    onnx.save(unet_like("trt"), str(onnx_path))
    plan = tmp_path / "engine" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not a real plan")
    man = M.build_manifest(onnx_path, plan, build_info=BUILD_INFO, profile={"name": "int8"})
    return onnx_path, plan, man


def test_manifest_round_trip(built):
    onnx_path, plan, man = built
    path = M.write_manifest(man, plan)
    assert path == plan.parent / "engine.json"
    again = M.load_manifest(plan)  # the plan path finds engine.json beside it
    assert again == json.loads(json.dumps(man))
    assert again["tensorrt"]["version"] == "10.8.0.43" and again["gpu"]["compute_capability"] == "8.9"
    assert [i["name"] for i in again["onnx"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert again["onnx"]["inputs"][0]["dims"] == ["batch", 4, 8, 8]
    assert again["onnx"]["outputs"][0]["name"] == "out_sample" and again["onnx"]["form"] == "trt"
    assert again["onnx"]["timestep_groups"]["edges"] == [0.0, 500.0, 1000.0]
    assert again["shape_profiles"][0]["sample"]["max"] == [4, 4, 8, 8]
    assert len(again["onnx"]["sha256"]) == 64 and again["plan"]["bytes"] == len(b"not a real plan")


def test_compatibility_refusal(built):
    _, _, man = built
    M.check_engine_compatible(man, "10.8.0.43", "8.9")
    M.check_engine_compatible(man, "10.8.0.99", "8.9")  # same release, other build number
    with pytest.raises(EngineIncompatibleError) as e:
        M.check_engine_compatible(man, "10.9.0.1", "8.9")
    assert "TensorRT 10.8.0.43" in e.value.message and "10.9.0.1" in e.value.message and "rebuild" in e.value.hint
    with pytest.raises(EngineIncompatibleError) as e:
        M.check_engine_compatible(man, "10.8.0.43", "9.0")
    assert "compute capability 8.9 (NVIDIA L4)" in e.value.message and "9.0" in e.value.message


def test_load_manifest_errors(tmp_path):
    with pytest.raises(EngineError, match="no engine manifest"):
        M.load_manifest(tmp_path / "model.plan")
    (tmp_path / "engine.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(EngineError, match="unknown manifest format"):
        M.load_manifest(tmp_path / "engine.json")


def test_triton_repo_matches_the_onnx(built, tmp_path):
    onnx_path, plan, man = built
    model_dir = M.write_triton_repo(tmp_path / "repo", "quest_unet", onnx_path, plan, man)
    assert (model_dir / "1" / "model.plan").read_bytes() == plan.read_bytes()
    text = (model_dir / "config.pbtxt").read_text()
    cfg = T.parse_config_pbtxt(text)
    assert cfg["name"] == "quest_unet" and cfg["platform"] == "tensorrt_plan"
    # timestep is its own length-n tensor: requests must not be concatenated -> max_batch_size 0, -1 batch dims
    assert cfg["max_batch_size"] == 0 and "dynamic_batching" not in cfg and "timestep[0]" in text
    inputs, outputs = io_signature(onnx.load(str(onnx_path)))
    want = {s.name: ("TYPE_FP16" if s.dtype == "float16" else "TYPE_FP32", [d if isinstance(d, int) else -1 for d in s.dims])
            for s in inputs + outputs}
    got = {t["name"]: (t["data_type"], t["dims"]) for t in cfg["input"] + cfg["output"]}
    assert got == want
    # writing again replaces the model folder atomically
    M.write_triton_repo(tmp_path / "repo", "quest_unet", onnx_path, plan, man)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["quest_unet"]


def test_triton_dynamic_batching_for_batch_major_graphs(built, tmp_path):
    _, plan, _ = built
    onnx_path = tmp_path / "batch_major.onnx"
    onnx.save(unet_like("fp", timestep_sym="batch"), str(onnx_path))  # timestep shares the batch symbol
    man = M.build_manifest(onnx_path, plan, build_info=BUILD_INFO)
    cfg = T.parse_config_pbtxt(T.triton_config("m", man))
    assert cfg["max_batch_size"] == 4 and "dynamic_batching" in cfg
    dims = {t["name"]: t["dims"] for t in cfg["input"] + cfg["output"]}
    assert dims["sample"] == [4, 8, 8] and dims["timestep"] == [1] and dims["encoder_hidden_states"] == [-1, 16]


def test_scalar_io_gets_a_reshape(built):
    _, _, man = built
    man = json.loads(json.dumps(man))
    man["onnx"]["inputs"][1]["dims"] = []
    cfg = T.parse_config_pbtxt(T.triton_config("m", man))
    ts = [t for t in cfg["input"] if t["name"] == "timestep"][0]
    assert ts["dims"] == [1] and "reshape" in ts


@pytest.mark.parametrize("bad,needle", [
    ('name: "m"\nplatform: "tensorrt_plan"\nmax_batch_sise: 0\n', "does not parse"),
    ('name: "m"\nplatform: "tensorrt_plan"\ninput [ { name: "x" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]\n', "does not parse"),
    ('name: "m"\nplatform: "tensorrt_plan"\ninput [ { name: "x" data_type: TYPE_FP32 } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]\n', "rank >= 1"),
    ('name: "m"\nplatform: "onnxruntime_onnx"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [1] } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]\n', "tensorrt_plan"),
])
def test_config_parser_is_strict(bad, needle):
    with pytest.raises(EngineError, match=needle.replace("[", r"\[")):
        T.parse_config_pbtxt(bad)


def test_config_parses_with_tritons_own_schema_when_available(built):
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient not installed (optional cross-check)")
    from google.protobuf import text_format

    _, _, man = built
    msg = text_format.Parse(T.triton_config("quest_unet", man), pb2.ModelConfig())
    assert msg.platform == "tensorrt_plan" and [i.name for i in msg.input] == ["sample", "timestep", "encoder_hidden_states"]
