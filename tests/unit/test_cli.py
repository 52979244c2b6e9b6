"""The command line: stages listed, help with examples, bad input as one clear line and a non-zero exit."""

import pytest

from questdeploy.cli import cli, main

STAGE_COMMANDS = ["calibrate", "finetune", "export", "verify", "build-engine", "eval", "run"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_stage(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for name in STAGE_COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", STAGE_COMMANDS)
def test_every_subcommand_has_help_with_examples(capsys, name):
    code, out, _ = _run(capsys, name, "--help")
    assert code == 0 and "Examples:" in out and "questdeploy " + name.split()[0] in out


def _assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("warning:", "Cannot initialize"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = _run(capsys, "calibrate", "--model", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"))
    _assert_one_line_error(code, err, "does not exist")


def test_non_diffusers_folder(capsys, tmp_path):
    code, _, err = _run(capsys, "calibrate", "--model", str(tmp_path), "--run-dir", str(tmp_path / "r"))
    _assert_one_line_error(code, err, "not a diffusers model folder", "Hint:")


def test_hub_id(capsys, tmp_path):
    code, _, err = _run(capsys, "calibrate", "--model", "CompVis/stable-diffusion-v1-4", "--run-dir", str(tmp_path / "r"))
    _assert_one_line_error(code, err, "hub id", "--model DIR")


def test_unknown_option(capsys):
    code, _, err = _run(capsys, "finetune", "--no-such-flag")
    _assert_one_line_error(code, err, "--no-such-flag", "questdeploy finetune --help")
    assert code == 2


def test_unsupported_bits_before_loading_anything(capsys, tmp_path):
    code, _, err = _run(capsys, "finetune", "--bits", "w3a5", "--run-dir", str(tmp_path / "r"))
    _assert_one_line_error(code, err, "w3a5", "w4a8")
    assert not (tmp_path / "r").exists()


def test_run_folder_from_another_model(capsys, tmp_path, tiny_cond_pipeline, tiny_uncond_unet):
    run = str(tmp_path / "r")
    code, out, err = _run(capsys, "calibrate", "--model", str(tiny_cond_pipeline), "--run-dir", run,
                          "--steps", "2", "--num-samples", "2", "--quiet")
    assert code == 0, err
    before = (tmp_path / "r" / "run.json").read_text()
    code, _, err = _run(capsys, "calibrate", "--model", str(tiny_uncond_unet), "--run-dir", run, "--steps", "2", "--quiet")
    _assert_one_line_error(code, err, "was made from model")
    assert (tmp_path / "r" / "run.json").read_text() == before


def test_stage_before_its_inputs(capsys, tmp_path, tiny_cond_pipeline):
    code, _, err = _run(capsys, "finetune", "--model", str(tiny_cond_pipeline), "--run-dir", str(tmp_path / "r"), "--quiet")
    _assert_one_line_error(code, err, "needs the outputs of 'calibrate'")


def test_commands_are_documented():
    for name, cmd in cli.commands.items():
        assert cmd.help and cmd.help.strip(), f"{name} has no docstring"


def test_threads_option_sets_torch_threads_and_is_recorded(capsys, tmp_path, tiny_cond_pipeline):
    import json

    import torch

    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    try:
        code, _, err = _run(capsys, "calibrate", "--model", str(tiny_cond_pipeline), "--run-dir", str(tmp_path / "r"),
                            "--steps", "2", "--num-samples", "2", "--quiet", "--threads", str(want))
        assert code == 0, err
        assert torch.get_num_threads() == want
        manifest = json.loads((tmp_path / "r" / "run.json").read_text())
        assert manifest["stages"]["calibrate"]["environment"]["torch_threads"] == str(want)
    finally:
        torch.set_num_threads(before)
    code, _, err = _run(capsys, "finetune", "--threads", "-1", "--run-dir", str(tmp_path / "r2"))
    assert code != 0 and "--threads" in err and not (tmp_path / "r2").exists()
