"""Run folder: atomic stage outputs, manifest as the source of truth, locking, model binding."""

import json
import multiprocessing as mp

import pytest

from questdeploy.errors import RunFolderError
from questdeploy.runfolder import RunFolder, write_text_atomic


def test_stage_output_is_atomic_on_failure(tmp_path):
    run = RunFolder(tmp_path / "r")
    with run.stage_output("s", {"config": {"a": 1}}) as tmp:
        (tmp / "x.txt").write_text("one")
    assert run.is_done("s")
    before = run.manifest_path.read_text()
    with pytest.raises(RuntimeError):
        with run.stage_output("s", {"config": {"a": 2}}) as tmp:
            (tmp / "x.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (run.stage_dir("s") / "x.txt").read_text() == "one"
    assert run.manifest_path.read_text() == before
    assert not list(run.path.glob(".tmp-*"))


def test_edited_output_is_not_done(tmp_path):
    run = RunFolder(tmp_path / "r")
    with run.stage_output("s", {}) as tmp:
        (tmp / "x.txt").write_text("one")
    (run.stage_dir("s") / "x.txt").write_text("tampered")
    assert not run.is_done("s")


def test_files_without_manifest_entry_are_not_done(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.stage_dir("s").mkdir(parents=True)
    (run.stage_dir("s") / "x.txt").write_text("orphan")
    assert not run.is_done("s")


def test_bind_model_refuses_other_model(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.bind_model("a" * 64, "/models/a")
    run.bind_model("a" * 64, "/models/a")
    with pytest.raises(RunFolderError, match="was made from model"):
        run.bind_model("b" * 64, "/models/b")


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    run = RunFolder(tmp_path / "r")
    write_text_atomic(run.manifest_path, "{not json")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        run.load()
    write_text_atomic(run.manifest_path, json.dumps({"hello": 1}))
    with pytest.raises(RunFolderError, match="not a questdeploy run manifest"):
        run.load()


def _hold_lock(path, ready, release):
    with RunFolder(path).locked():
        ready.set()
        release.wait(10)


def test_second_process_is_refused(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path / "r", ready, release))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(RunFolderError, match="in use by another questdeploy process"):
            with RunFolder(tmp_path / "r").locked():
                pass
    finally:
        release.set()
        p.join(10)
    with RunFolder(tmp_path / "r").locked():
        pass


def test_leftover_temporaries_are_cleaned_under_lock(tmp_path):
    run = RunFolder(tmp_path / "r")
    (run.path / ".tmp-finetune-abc").mkdir(parents=True)
    with run.locked():
        pass
    assert not (run.path / ".tmp-finetune-abc").exists()


def test_environment_drift_is_reported(tmp_path, monkeypatch):
    import questdeploy.runfolder as rf

    run = RunFolder(tmp_path / "r")
    run.bind_model("a" * 64, "/m")
    assert run.environment_drift() == {}
    real = rf.environment
    monkeypatch.setattr(rf, "environment", lambda: {**real(), "torch": "9.9.9"})
    drift = run.environment_drift()
    assert drift["torch"][1] == "9.9.9" and drift["torch"][0] != "9.9.9"


def test_cli_warns_on_environment_drift(tmp_path, tiny_cond_pipeline, capsys, monkeypatch):
    import questdeploy.runfolder as rf
    from questdeploy.cli import main

    args = ["calibrate", "--model", str(tiny_cond_pipeline), "--run-dir", str(tmp_path / "r"),
            "--steps", "2", "--num-samples", "2", "--quiet"]
    assert main(args) == 0
    real = rf.environment
    monkeypatch.setattr(rf, "environment", lambda: {**real(), "onnxruntime": "0.0.1"})
    capsys.readouterr()
    assert main(args) == 0
    assert "warning: environment differs" in capsys.readouterr().err
