"""Inputs users really get wrong: each ends in one clear line, a non-zero exit, and an unchanged run folder."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from questdeploy.cli import main

CAL = ["--steps", "2", "--num-samples", "4", "--batch-size", "4", "--quiet"]
FT = ["--groups", "2", "--tla-iters", "1", "--cma-iters", "1", "--cma-epochs", "1", "--quiet"]


def _one_line(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"} if root.exists() else {}


@pytest.fixture()
def calibrated(tmp_path, tiny_cond_pipeline, capsys):
    run = tmp_path / "run"
    assert main(["calibrate", "--model", str(tiny_cond_pipeline), "--run-dir", str(run), *CAL]) == 0
    capsys.readouterr()
    return run


def test_empty_weight_file(tmp_path, tiny_uncond_unet, capsys):
    m = tmp_path / "m"
    shutil.copytree(tiny_uncond_unet, m)
    (m / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    _one_line(capsys, ["calibrate", "--model", str(m), "--run-dir", str(tmp_path / "r")], "could not load")
    assert not (tmp_path / "r").exists()


def test_config_with_unknown_keys(tmp_path, tiny_uncond_unet, capsys):
    m = tmp_path / "m"
    shutil.copytree(tiny_uncond_unet, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["layers_per_blok"] = 2
    (m / "config.json").write_text(json.dumps(cfg))
    _one_line(capsys, ["calibrate", "--model", str(m), "--run-dir", str(tmp_path / "r")], "layers_per_blok", "Hint:")


def test_nan_weights(tmp_path, tiny_uncond_unet, capsys):
    from safetensors.torch import load_file, save_file

    m = tmp_path / "m"
    shutil.copytree(tiny_uncond_unet, m)
    w = load_file(str(m / "diffusion_pytorch_model.safetensors"))
    k = next(iter(w))
    w[k].view(-1)[0] = float("nan")
    save_file(w, str(m / "diffusion_pytorch_model.safetensors"))
    _one_line(capsys, ["calibrate", "--model", str(m), "--run-dir", str(tmp_path / "r")], "NaN/Inf in weight")


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "--groups", "0"], "--groups 0"),
    (["finetune", "--bits", "w8a3"], "unsupported --bits"),
    (["finetune", "--method", "magic"], "magic"),
    (["calibrate", "--steps", "0"], "--steps 0"),
    (["eval", "--num-samples", "0"], "positive"),
])
def test_flags_out_of_range(tmp_path, capsys, argv, needle):
    _one_line(capsys, [*argv, "--run-dir", str(tmp_path / "r")], needle)
    assert not (tmp_path / "r").exists()


def test_hand_edited_checkpoint_is_refused_and_run_unchanged(calibrated, tiny_cond_pipeline, capsys):
    model = ["--model", str(tiny_cond_pipeline), "--run-dir", str(calibrated)]
    assert main(["finetune", *model, "--method", "ptq", *FT]) == 0
    spec_path = calibrated / "finetune" / "checkpoint" / "quant_spec.json"
    spec = json.loads(spec_path.read_text())
    spec["quantizers"] = spec["quantizers"][1:]
    spec_path.write_text(json.dumps(spec))
    before = _snapshot(calibrated)
    capsys.readouterr()
    _one_line(capsys, ["eval", "--quantized", *model, "--num-samples", "2", "--steps", "2", "--quiet"],
              "changed after it ran", "quant_spec.json", "--force")
    assert _snapshot(calibrated) == before


def test_inconsistent_spec_loaded_directly_is_a_spec_error(calibrated, tiny_cond_pipeline, capsys):
    from questdeploy.models import load_model
    from questdeploy.quant.errors import SpecError
    from questdeploy.quant.spec import load_checkpoint

    assert main(["finetune", "--model", str(tiny_cond_pipeline), "--run-dir", str(calibrated), "--method", "ptq", *FT]) == 0
    ck = calibrated / "finetune" / "checkpoint"
    spec = json.loads((ck / "quant_spec.json").read_text())
    spec["quantizers"][0]["bits"] = 3
    (ck / "quant_spec.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError):
        load_checkpoint(load_model(tiny_cond_pipeline).unet, ck)


def test_checkpoint_of_another_model_is_refused(calibrated, tiny_cond_pipeline, tmp_path):
    from questdeploy.models import load_model
    from questdeploy.quant.errors import SpecError
    from questdeploy.quant.spec import load_checkpoint

    sys.path.insert(0, os.path.dirname(__file__) + "/..")
    from conftest import make_tiny_uncond_unet

    assert main(["finetune", "--model", str(tiny_cond_pipeline), "--run-dir", str(calibrated), "--method", "ptq", *FT]) == 0
    other = load_model(make_tiny_uncond_unet(tmp_path / "other"))
    with pytest.raises(SpecError):
        load_checkpoint(other.unet, calibrated / "finetune" / "checkpoint")


def test_run_folder_moved_to_another_path(calibrated, tiny_cond_pipeline, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(calibrated), str(moved))
    assert main(["calibrate", "--model", str(tiny_cond_pipeline), "--run-dir", str(moved), *CAL]) == 0
    assert "up to date, skipped" in capsys.readouterr().out
    assert main(["finetune", "--model", str(tiny_cond_pipeline), "--run-dir", str(moved), "--method", "ptq", *FT]) == 0


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE simulation is Linux-only")
def test_full_disk_leaves_run_folder_unchanged(calibrated, tiny_cond_pipeline):
    before = _snapshot(calibrated)
    r = subprocess.run([sys.executable, "-m", "questdeploy.cli", "finetune", "--model", str(tiny_cond_pipeline),
                        "--run-dir", str(calibrated), "--method", "ptq", *FT],
                       capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert r.returncode == 5, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "Traceback" not in r.stderr
    assert _snapshot(calibrated) == before
    assert not list(calibrated.glob(".tmp-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_run_folder(calibrated, tiny_cond_pipeline, capsys):
    os.chmod(calibrated, 0o555)
    try:
        _one_line(capsys, ["finetune", "--model", str(tiny_cond_pipeline), "--run-dir", str(calibrated), *FT], "cannot write")
    finally:
        os.chmod(calibrated, 0o755)
