"""export -> verify -> build-engine through the CLI on a tiny model: success paths and the errors users meet."""

import json

import onnx
import pytest
from onnx import helper, TensorProto

from questdeploy.cli import main
from questdeploy.errors import VerificationError
from questdeploy.stages.verify import load_our_onnx

pytestmark = pytest.mark.slow

CAL = ["--steps", "3", "--num-samples", "4", "--batch-size", "4", "--quiet"]
PTQ = ["--method", "ptq", "--groups", "2", "--quiet"]


def _err_line(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trt_run(tmp_path_factory, tiny_cond_pipeline):
    run = tmp_path_factory.mktemp("deploy") / "run"
    common = ["--model", str(tiny_cond_pipeline), "--run-dir", str(run)]
    assert main(["calibrate", *common, *CAL]) == 0
    assert main(["finetune", *common, *PTQ, "--bits", "w8a8", "--target", "trt"]) == 0
    assert main(["export", *common, "--target", "trt", "--quiet"]) == 0
    return common, run


def test_export_writes_a_checked_onnx(trt_run):
    _, run = trt_run
    m = onnx.load(str(run / "export" / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert {n.op_type for n in m.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert all(o.domain in ("", "ai.onnx") for o in m.opset_import)


def test_verify_passes_and_writes_its_artifacts(trt_run, capsys):
    common, run = trt_run
    assert main(["verify", *common, "--steps", "3", "--num-samples", "2", "--quiet"]) == 0
    rep = json.loads((run / "verify" / "verify.json").read_text())
    assert rep["passed"] and rep["exactness"]["mismatches"] == 0
    for f in ("per_timestep_error.png", "golden_inputs.json", "golden_outputs.json"):
        assert (run / "verify" / f).stat().st_size > 0


def test_tolerance_breach_exits_4_with_one_line(trt_run, capsys):
    common, _ = trt_run
    code = main(["verify", *common, "--steps", "3", "--num-samples", "2", "--max-rel-l2", "1e-12", "--force", "--quiet"])
    assert code == 4
    assert "verify failed" in _err_line(capsys)


def test_build_engine_lint_passes_and_build_says_what_is_missing(trt_run, capsys):
    common, run = trt_run
    assert main(["build-engine", *common, "--check-only", "--no-polygraphy-lint", "--quiet"]) == 0
    lint = json.loads((run / "build-engine" / "lint.json").read_text())
    assert lint["passed"] and lint["form"] == "trt"
    assert ".tmp-" not in (run / "build-engine" / "build_commands.sh").read_text()
    pytest.importorskip("questdeploy")  # keep the order explicit
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the GPU tests cover the real build")
    except ImportError:
        pass
    capsys.readouterr()
    code = main(["build-engine", *common, "--no-polygraphy-lint", "--quiet"])
    assert code == 3 and "tensorrt" in _err_line(capsys).lower()


def test_trt_export_of_an_ort_checkpoint_is_refused(tmp_path, tiny_cond_pipeline, capsys):
    common = ["--model", str(tiny_cond_pipeline), "--run-dir", str(tmp_path / "r")]
    assert main(["calibrate", *common, *CAL]) == 0
    assert main(["finetune", *common, *PTQ, "--bits", "w8a8"]) == 0
    capsys.readouterr()
    assert main(["export", *common, "--target", "trt", "--quiet"]) == 2
    assert "--target trt" in _err_line(capsys)
    assert not (tmp_path / "r" / "export").exists()


def test_verify_refuses_foreign_and_truncated_onnx(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    foreign = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(VerificationError, match="not written by questdeploy"):
        load_our_onnx(tmp_path / "foreign.onnx")
    data = (tmp_path / "foreign.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(VerificationError, match="not a readable ONNX"):
        load_our_onnx(tmp_path / "cut.onnx")


def test_engine_checks_without_tensorrt_say_so(trt_run, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the GPU tests cover engine checks")
    except ImportError:
        pass
    common, run = trt_run
    assert main(["verify", *common, "--steps", "3", "--num-samples", "2", "--quiet"]) == 0
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not really a plan")
    capsys.readouterr()
    assert main(["verify", *common, "--engine", str(plan), "--quiet"]) == 3
    assert "tensorrt" in _err_line(capsys).lower()
    assert main(["eval", *common, "--engine", str(tmp_path / "missing.plan"), "--quiet"]) == 2
    assert "does not exist" in _err_line(capsys)
    assert not (run / "verify-engine").exists()


def test_same_seed_same_onnx_bytes(trt_run, capsys):
    from questdeploy.runfolder import sha256_file

    common, run = trt_run
    first = sha256_file(run / "export" / "model.onnx")
    assert main(["export", *common, "--target", "trt", "--force", "--quiet"]) == 0
    assert sha256_file(run / "export" / "model.onnx") == first


def test_ort_int_export_verifies_and_the_trt_lint_refuses_it(tmp_path, tiny_cond_pipeline, capsys):
    run = tmp_path / "r"
    common = ["--model", str(tiny_cond_pipeline), "--run-dir", str(run)]
    assert main(["calibrate", *common, *CAL]) == 0
    assert main(["finetune", *common, *PTQ, "--bits", "w8a8"]) == 0
    assert main(["export", *common, "--target", "ort-int", "--quiet"]) == 0
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["target"] == "ort-int" and info["lowering"]["integer"]["convs"] > 0
    assert main(["verify", *common, "--steps", "3", "--num-samples", "2", "--quiet"]) == 0
    rep = json.loads((run / "verify" / "verify.json").read_text())
    assert rep["passed"] and rep["form"] == "ort-int" and rep["exactness"]["mismatches"] == 0
    assert rep["integer_layers"]["layers"] == info["lowering"]["integer"]["convs"] + info["lowering"]["integer"]["linears"]
    assert rep["integer_layers"]["rel_err_max"] <= 1e-6
    assert rep["reference"]["out_sample"]["rel_l2"] <= 0.05 and rep["trajectory"]["psnr_db"] >= 30
    capsys.readouterr()
    assert main(["build-engine", *common, "--check-only", "--no-polygraphy-lint", "--quiet"]) != 0
    _err_line(capsys)
    lint = json.loads((run / "build-engine" / "lint.json").read_text())
    fixes = {f["fix"] for f in lint["findings"] if f["rule"] in ("ort-int-form", "profile")}
    assert lint["form"] == "ort-int" and fixes == {"export with `--target trt`", "export with `--target trt` and build that file"}


def test_run_with_the_ort_int_target_exports_that_form(tmp_path, tiny_cond_pipeline):
    run = tmp_path / "r"
    args = ["run", "--model", str(tiny_cond_pipeline), "--run-dir", str(run), "--calib-steps", "3", "--calib-samples", "4",
            "--eval-samples", "2", "--method", "ptq", "--groups", "2", "--bits", "w8a8", "--target", "ort-int", "--quiet"]
    assert main(args) == 0
    assert json.loads((run / "export" / "export.json").read_text())["target"] == "ort-int"
    assert json.loads((run / "verify" / "verify.json").read_text())["form"] == "ort-int"
    spec = json.loads((run / "finetune" / "checkpoint" / "quant_spec.json").read_text())
    assert spec["target"] == "ort"  # the checkpoint holds the ort quantizers
