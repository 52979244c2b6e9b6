"""The stage graph end to end on a tiny model: calibrate -> finetune -> eval, skipping, resuming, errors."""

import json

import pytest
import torch

from questdeploy.errors import ConfigError, DataError, StageNotReadyError
from questdeploy.models import load_model
from questdeploy.quest.finetune import FinetuneConfig, parse_bits
from questdeploy.runfolder import RunFolder
from questdeploy.stages import calibrate, evaluate, finetune
from questdeploy.stages.base import StageContext, run_stage

TINY_FT = dict(num_groups=3, tla_iters_per_group=2, cma_iters_per_group=2, cma_epochs=1, batch_size=4, calib_samples_per_step=4)


@pytest.fixture()
def ctx(tmp_path, tiny_cond_pipeline):
    run = RunFolder(tmp_path / "run")
    m = load_model(tiny_cond_pipeline)
    run.bind_model(m.model_id, m.path)
    return StageContext(run=run, model=m, seed=0, progress=False, log=lambda s: None)


def _calibrate(ctx, **kw):
    return run_stage(ctx, calibrate.STAGE, calibrate.CalibrateConfig(steps=4, num_samples=6, batch_size=4, **kw))


def test_calibrate_records_the_trajectory(ctx):
    res = _calibrate(ctx)
    data = calibrate.CalibrationData(res.outputs)
    assert len(data) == 4 and data.timesteps == sorted(data.timesteps, reverse=True)
    x0, eps0 = data.step(0)
    assert x0.shape == (6, 1, 8, 8) and eps0.shape == x0.shape
    # the sample stored with t_k is the one the UNet saw with t_k: re-running the UNet reproduces eps
    cond = data.cond
    with torch.no_grad():
        again = ctx.model.unet(x0, torch.full((6,), data.timesteps[0]), encoder_hidden_states=cond).sample
    torch.testing.assert_close(again, eps0, rtol=1e-4, atol=1e-5)
    x1, eps1 = data.step(1)
    with torch.no_grad():
        again1 = ctx.model.unet(x1, torch.full((6,), data.timesteps[1]), encoder_hidden_states=cond).sample
    torch.testing.assert_close(again1, eps1, rtol=1e-4, atol=1e-5)


def test_up_to_date_stage_is_skipped_and_config_change_reruns(ctx):
    assert not _calibrate(ctx).skipped
    assert _calibrate(ctx).skipped
    res = run_stage(ctx, calibrate.STAGE, calibrate.CalibrateConfig(steps=3, num_samples=6, batch_size=4))
    assert not res.skipped and len(calibrate.CalibrationData(res.outputs)) == 3


def test_finetune_needs_calibration(ctx):
    with pytest.raises(StageNotReadyError, match="needs the outputs of 'calibrate'") as ei:
        run_stage(ctx, finetune.STAGE, FinetuneConfig(**TINY_FT))
    assert "questdeploy calibrate" in ei.value.hint


@pytest.mark.parametrize("method", ["ptq", "quest", "full"])
def test_finetune_methods_write_a_checkpoint(ctx, method):
    _calibrate(ctx)
    res = run_stage(ctx, finetune.STAGE, FinetuneConfig(method=method, **TINY_FT))
    ck = res.outputs / "checkpoint"
    spec = json.loads((ck / "quant_spec.json").read_text())
    assert (ck / "model.safetensors").is_file() and spec
    report = json.loads((res.outputs / "report.json").read_text())
    if method == "ptq":
        assert report["trainable_params"] == 0
    elif method == "quest":
        assert 0 < report["trainable_params"] < 0.5 * report["total_params"]
        assert report["tla_layers"] and report["cma_layers"]
    else:
        assert report["trainable_params"] > 0.9 * report["total_params"]


def test_quest_changes_only_selected_layers(ctx):
    from safetensors.torch import load_file

    _calibrate(ctx)
    ptq = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="ptq", **TINY_FT))
    a = load_file(str(ptq.outputs / "checkpoint" / "model.safetensors"))
    q = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="quest", **TINY_FT))
    b = load_file(str(q.outputs / "checkpoint" / "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    weights_changed = {k for k in changed if "quantizer" not in k}
    assert weights_changed, "finetuning changed nothing"
    assert all("time_emb_proj" in k or ".ff.net." in k for k in weights_changed), weights_changed
    assert not any("weight_quantizer" in k for k in changed), "weight scales must stay frozen"


def test_finetune_is_deterministic(ctx, tmp_path):
    from questdeploy.runfolder import sha256_file

    _calibrate(ctx)
    h = []
    for _ in range(2):
        res = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="quest", **TINY_FT))
        h.append(sha256_file(res.outputs / "checkpoint" / "model.safetensors"))
        ctx.run.invalidate("finetune")
    assert h[0] == h[1]


def test_eval_quantized_compares_with_fp(ctx):
    _calibrate(ctx)
    run_stage(ctx, finetune.STAGE, FinetuneConfig(method="ptq", bits="w8a8", **TINY_FT))
    res = run_stage(ctx, evaluate.STAGE_QUANT, evaluate.EvalConfig(num_samples=8, steps=3, batch_size=8, quantized=True))
    m = json.loads((res.outputs / "metrics.json").read_text())
    assert m["quantized"]["psnr_vs_fp_db"] > 10
    for png in ("samples_fp.png", "samples_quantized.png", "compare_fp_vs_quantized.png", "per_timestep_error.png"):
        assert (res.outputs / png).stat().st_size > 100
    pt = m["per_timestep"]
    assert pt["samples"] == 8 and pt["steps"] == 3 == len(pt["rows"])
    ts = [r["timestep"] for r in pt["rows"]]
    assert ts == sorted(ts, reverse=True)  # sampling order, high noise first
    assert all(0 < r["rel_l2"] < 1 and r["finite"] for r in pt["rows"])  # the quantized model, not FP, was scored
    assert pt["rel_l2_max"] == max(r["rel_l2"] for r in pt["rows"])
    assert "rows" not in res.summary["per_timestep"]  # the manifest and the console get the summary only


def test_eval_blame_ranks_activation_quantizers_at_the_worst_steps(ctx):
    _calibrate(ctx)
    run_stage(ctx, finetune.STAGE, FinetuneConfig(method="ptq", bits="w8a8", **TINY_FT))
    cfg = evaluate.EvalConfig(num_samples=8, steps=4, batch_size=8, quantized=True, blame=True)
    res = run_stage(ctx, evaluate.STAGE_QUANT, cfg)
    m = json.loads((res.outputs / "metrics.json").read_text())
    rows = m["per_timestep"]["rows"]
    worst = sorted(rows, key=lambda r: r["rel_l2"], reverse=True)[:2]
    assert sorted(m["blame"]["timesteps"]) == sorted(r["timestep"] for r in worst)
    shares = [q["error_share"] for q in m["blame"]["quantizers"]]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0
    assert all(q["name"].endswith("quantizer") for q in m["blame"]["quantizers"])
    assert len(res.summary["blame"]) == min(5, len(shares))
    with pytest.raises(ConfigError, match="--blame") as err:
        evaluate.EvalConfig(blame=True)
    assert "--quantized" in err.value.hint


def test_per_timestep_error_feeds_both_models_the_fp_trajectory(ctx):
    from questdeploy.runners.torch_runner import TorchRunner

    cfg = evaluate.EvalConfig(num_samples=6, steps=4, per_timestep_samples=4)
    fp = ctx.model.unet
    same, feeds = evaluate.per_timestep_error(ctx, TorchRunner(fp), cfg)
    assert len(same) == len(feeds) == 4 and all(r["rel_l2"] == 0.0 and r["max_abs"] == 0.0 for r in same)
    seen = []

    def shifted(sample, timestep, encoder_hidden_states):
        seen.append((sample.shape[0], int(timestep[0])))
        return fp(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample + 0.01

    rows, _ = evaluate.per_timestep_error(ctx, TorchRunner(shifted), cfg)
    assert [b for b, _ in seen] == [4] * 4 and [t for _, t in seen] == [r["timestep"] for r in rows]
    assert all(r["max_abs"] == pytest.approx(0.01, rel=1e-4) for r in rows)


def test_nan_in_calibration_data_is_refused(ctx):
    from safetensors.torch import load_file, save_file

    res = _calibrate(ctx)
    f = res.outputs / "steps" / "step_001.safetensors"
    d = load_file(str(f))
    d["sample"][0, 0, 0, 0] = float("nan")
    save_file(d, str(f))
    with pytest.raises(DataError, match="NaN"):
        calibrate.CalibrationData(res.outputs).step(1)


@pytest.mark.parametrize("bits", ["w3a5", "w8", "a8w8", "w16a16", ""])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="unsupported --bits"):
        parse_bits(bits)


def test_good_bits():
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w8a16") == (8, None)


def test_learning_rate_defaults_per_method_and_explicit_wins():
    assert FinetuneConfig(method="quest").lr_weights == 1e-4
    assert FinetuneConfig(method="full").lr_weights == 1e-5
    assert FinetuneConfig(method="full", lr_weights=3e-4).lr_weights == 3e-4
    with pytest.raises(ConfigError, match="weight-rounding"):
        FinetuneConfig(weight_rounding="stochastic")


def test_scale_learning_rate_follows_method_and_activation_bits_and_explicit_wins():
    assert FinetuneConfig(bits="w4a4").lr_scales == 3e-3
    assert FinetuneConfig(bits="w4a4", method="full").lr_scales == 3e-3
    assert FinetuneConfig(bits="w4a8").lr_scales == FinetuneConfig(bits="w8a8").lr_scales == 1e-3
    assert FinetuneConfig(bits="w4a16").lr_scales == 1e-3
    assert FinetuneConfig(bits="w4a4", lr_scales=5e-4).lr_scales == 5e-4


def test_calibrate_resumes_per_step(ctx, monkeypatch):
    """A calibration interrupted after step 2 continues there and gives the same data as one pass."""
    from safetensors.torch import load_file

    ref = _calibrate(ctx)
    ref_steps = {p.name: load_file(str(p)) for p in (ref.outputs / "steps").iterdir()}
    ctx.run.invalidate("calibrate")
    calls = {"n": 0}
    real_step = type(ctx.model.unet).forward

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 batches per step: dies during step 2
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(type(ctx.model.unet), "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        _calibrate(ctx)
    monkeypatch.setattr(type(ctx.model.unet), "forward", real_step)
    assert not ctx.run.is_done("calibrate")
    logs = []
    ctx.log = logs.append
    res = _calibrate(ctx)
    assert any("resuming at step 2" in m for m in logs)
    for p in (res.outputs / "steps").iterdir():
        for k, v in load_file(str(p)).items():
            assert torch.equal(v, ref_steps[p.name][k]), (p.name, k)
    assert not list((ctx.run.path / ".resume").glob("calibrate-*"))


def test_recipes_ship_and_flags_override(tmp_path):
    from pathlib import Path

    root = Path(__file__).parents[2] / "calibration"
    cfg = calibrate.config_from(root / "default.toml")
    assert cfg == calibrate.CalibrateConfig()  # the shipped default is the default
    assert calibrate.config_from(root / "paper-lsun.toml", steps=7).steps == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("[calibrate]\nsteps = 25\nstepz = 3\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        calibrate.config_from(bad)


def test_w4_keeps_the_measured_most_sensitive_weights_8bit_within_budget(ctx):
    _calibrate(ctx)
    res = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="ptq", bits="w4a8", w8_budget=0.2, **TINY_FT))
    report = json.loads((res.outputs / "report.json").read_text())
    assert report["weight_8bit_layers"] and 0 < report["weight_8bit_fraction"] <= 0.2
    spec = json.loads((res.outputs / "checkpoint" / "quant_spec.json").read_text())
    assert set(report["weight_8bit_layers"]) <= set(spec["config"]["weight_8bit"])
    pure = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="ptq", bits="w4a8", w8_budget=0.0, **TINY_FT))
    assert json.loads((pure.outputs / "report.json").read_text())["weight_8bit_fraction"] == 0.0


def test_caching_frozen_weights_does_not_change_the_finetuned_model(ctx, monkeypatch):
    """quest fake-quantizes the weights it never trains once; the checkpoint must be bit-identical."""
    import contextlib

    from questdeploy.quest import finetune as quest_finetune
    from questdeploy.runfolder import sha256_file

    _calibrate(ctx)
    cached = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="quest", **TINY_FT))
    h_cached = sha256_file(cached.outputs / "checkpoint" / "model.safetensors")
    ctx.run.invalidate("finetune")
    monkeypatch.setattr(quest_finetune, "_freeze_untrained", lambda *a: contextlib.ExitStack())
    plain = run_stage(ctx, finetune.STAGE, FinetuneConfig(method="quest", **TINY_FT))
    assert sha256_file(plain.outputs / "checkpoint" / "model.safetensors") == h_cached


@pytest.mark.parametrize("device,needle", [("mps", "not supported"), ("tpu", "unknown --device")])
def test_finetune_device_must_be_cpu_or_cuda(device, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        FinetuneConfig(device=device)
    assert "cpu, cuda or cuda:N" in e.value.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_finetune_on_cuda_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match="torch sees no CUDA device") as e:
        FinetuneConfig(device="cuda")
    assert "--device cpu" in e.value.hint


def test_local_loss_weight_defaults_by_activation_width_and_is_validated():
    assert FinetuneConfig(bits="w4a4").w_local == 0.0
    assert FinetuneConfig(bits="w4a8").w_local == FinetuneConfig(bits="w8a16").w_local == 1.0
    assert FinetuneConfig(bits="w4a4", w_local=0.5).w_local == 0.5
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="loss weights") as e:
            FinetuneConfig(w_local=bad)
        assert "--w-local" in e.value.hint


def test_global_only_loss_skips_the_teacher_forward(ctx):
    """Without the local term the FP noise prediction comes from the calibration data: the teacher never runs,
    and the loss is exactly w_global * MSE(quantized output, recorded FP output)."""
    from questdeploy.quest import finetune as qf

    _calibrate(ctx)
    calib = calibrate.CalibrationData(ctx.run.stage_dir("calibrate"))
    cfg = FinetuneConfig(method="quest", **TINY_FT)
    qunet = qf.initialise(ctx.model.unet, calib, cfg, ctx.model.num_train_timesteps)
    calls = []
    hook = ctx.model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        batch = qf._Batches(calib, 4, 0).draw([0])
        taps = list(qunet.quant_layers())[:2]
        with torch.no_grad():
            loss, local, glob = qf._loss(qunet, ctx.model.unet, batch, taps, 0.0, 2.0)
            assert not calls and local == 0.0
            out = qunet(batch[0], batch[1], batch[2])
            assert float(loss) == pytest.approx(2.0 * float(torch.nn.functional.mse_loss(out, batch[3])), rel=1e-6)
            _, local1, _ = qf._loss(qunet, ctx.model.unet, batch, taps, 1.0, 2.0)
            assert calls and local1 > 0.0
    finally:
        hook.remove()
