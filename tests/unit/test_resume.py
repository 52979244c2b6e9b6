"""Interruption: finetune killed with SIGKILL at a random point resumes to the bit-identical result."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from questdeploy.runfolder import RunFolder, sha256_file

ARGS = ["--groups", "2", "--tla-iters", "6", "--cma-iters", "6", "--cma-epochs", "1", "--quiet"]


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "questdeploy.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_cond_pipeline):
    model = str(tiny_cond_pipeline)
    calib = ["--steps", "3", "--num-samples", "8", "--batch-size", "8"]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, run):
        p = _cli("calibrate", "--model", model, "--run-dir", str(d), "--quiet", *calib)
        assert p.wait(120) == 0, p.stderr.read()
    p = _cli("finetune", "--model", model, "--run-dir", str(ref), *ARGS)
    assert p.wait(300) == 0, p.stderr.read()
    ref_hash = sha256_file(ref / "finetune" / "checkpoint" / "model.safetensors")

    # resume points every 4 iterations; kill at a random moment after the first one exists
    env = {}
    p = subprocess.Popen([sys.executable, "-m", "questdeploy.cli", "finetune", "--model", model, "--run-dir", str(run), *ARGS, "--checkpoint-every", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / ".resume").glob("*.pt")):
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert not RunFolder(run).is_done("finetune")
    p = subprocess.Popen([sys.executable, "-m", "questdeploy.cli", "finetune", "--model", model, "--run-dir", str(run), *ARGS, "--checkpoint-every", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resuming at iteration" in err
    assert sha256_file(run / "finetune" / "checkpoint" / "model.safetensors") == ref_hash
    assert not list((run / ".resume").glob("*.pt")), "resume state must be removed after success"
    assert not list(run.glob(".tmp-*"))
