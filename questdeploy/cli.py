"""The ``questdeploy`` command line: parse options, call the library, turn its errors into one line.

Nothing here computes anything; each command builds a stage config and calls ``run_stage``.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from pathlib import Path

import click

# Busy-waiting OpenMP threads made torch 5-6x slower whenever another process shared the cores (2-core CI
# machine; two W4A4 finetunes at once: 1,750 ms per iteration each when spinning, 270-300 passive). Passive
# waiting has a price on an idle machine: every small op wakes the sleeping thread, so with 2 threads an
# iteration on the small default model took 440-460 ms against 180-240 spinning and 230-290 with 1 thread
# (hence --threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__
from .errors import QuestDeployError
from .quest.finetune import FinetuneConfig

_FT = FinetuneConfig()  # --help shows the dataclass defaults, so they cannot drift

DEFAULT_RUN_DIR = Path("runs") / "default"


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def common_options(f):
    """Options every stage shares, so the same flag means the same thing everywhere."""

    @click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN_DIR,
                  show_default=True, help="Run folder holding every stage's artifacts and run.json.")
    @click.option("--model", "model", type=str, default=None,
                  help="Local diffusers folder (UNet2DModel / UNet2DConditionModel, or a pipeline folder). "
                       "Default: the embedded digits model.")
    @click.option("--conditioning", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="safetensors with 'encoder_hidden_states' (N, tokens, dim) for conditional UNets "
                       "shipped without an encoder questdeploy can run.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
    @click.option("--force", is_flag=True, help="Re-run even when the outputs are up to date.")
    @click.option("--quiet", is_flag=True, help="No progress bars.")
    @click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                  help="CPU threads for torch (0: torch's default, one per core). On the small default model 1 is "
                       "faster than 2 (see README); results depend on it in the last bits, so keep it across a run.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


COMMON_KEYS = ("run_dir", "model", "conditioning", "seed", "force", "quiet", "threads")  # common_options' parameters


def _pop_common(opts: dict) -> dict:
    """Take the common options out of a command's keyword arguments, for ``_context``; the rest stay in ``opts``."""
    return {k: opts.pop(k) for k in COMMON_KEYS}


def _context(run_dir: Path, model: str | None, conditioning: Path | None, seed: int, force: bool, quiet: bool,
             threads: int = 0):
    import torch

    from .models import load_model
    from .runfolder import RunFolder
    from .stages.base import StageContext

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model, conditioning)
    run = RunFolder(run_dir)
    return StageContext(run=run, model=loaded, seed=seed, progress=not quiet, force=force, log=_echo)


def _run_one(common: dict, stage, config):
    from .stages.base import run_stage

    ctx = _context(**common)
    with ctx.run.locked():
        ctx.run.bind_model(ctx.model.model_id, ctx.model.path)
        _warn_drift(ctx.run)
        res = run_stage(ctx, stage, config)
    _report(res)
    return res


def _warn_drift(run) -> None:
    drift = run.environment_drift()
    if drift:
        changes = ", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in drift.items()))
        _echo(f"warning: environment differs from the one {run.path} was made with ({changes}); results may differ.")


def _report(res) -> None:
    state = "up to date, skipped" if res.skipped else "done"
    click.echo(f"{res.name}: {state} -> {res.outputs}")
    for k, v in (res.summary or {}).items():
        click.echo(f"  {k}: {v}")


EPILOG_CALIBRATE = """\b
Examples:
  questdeploy calibrate                         # default digits model, runs/default
  questdeploy calibrate --model ./my-unet --steps 50 --num-samples 256 --run-dir runs/mine
  questdeploy calibrate --recipe calibration/paper-lsun.toml
"""

EPILOG_EVAL = """\b
Examples:
  questdeploy eval                              # FP model: 500 samples, accuracy, FID-proxy, grid PNG
  questdeploy eval --quantized --run-dir runs/w4a8   # + PSNR vs FP, per_timestep_error.png
  questdeploy eval --quantized --blame          # + which activation quantizers cost most, in metrics.json
  questdeploy eval --engine runs/default/build-engine/model.plan      # sample with a TensorRT engine (GPU)
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="questdeploy")
def cli():
    """questdeploy: QuEST low-bit quantization of diffusion UNets, to ONNX Q/DQ and TensorRT.

    \b
    Stages (each reads the previous stage's artifacts from the run folder):
      calibrate -> finetune -> export -> verify -> build-engine, plus eval;
      `questdeploy run` runs the whole graph, skipping what is up to date.
    """


@cli.command(epilog=EPILOG_CALIBRATE)
@common_options
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A calibration recipe TOML (see calibration/); flags given here override it.")
@click.option("--steps", type=int, default=None, help="DDIM steps of the recorded trajectory.  [default: 25]")
@click.option("--num-samples", type=int, default=None, help="Trajectories (samples per step).  [default: 128]")
@click.option("--batch-size", type=int, default=None, help="[default: 128]")
def calibrate(recipe, steps, num_samples, batch_size, **common):
    """Record the FP model's own sampling trajectory as calibration data."""
    from .stages.calibrate import STAGE, config_from

    _run_one(common, STAGE, config_from(recipe, steps=steps, num_samples=num_samples, batch_size=batch_size))


@cli.command(name="eval", epilog=EPILOG_EVAL)
@common_options
@click.option("--num-samples", type=int, default=500, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True, help="DDIM steps.")
@click.option("--batch-size", type=int, default=250, show_default=True)
@click.option("--quantized", is_flag=True, help="Also sample the finetuned quantized model and compare with FP.")
@click.option("--blame", is_flag=True, help="With --quantized: rank the activation quantizers by the share of the error "
              "each causes at the two sampler steps with the largest error (leave-one-out; 2 min on the default model).")
@click.option("--engine", "engine_plan", default=None, help="Sample with this TensorRT plan and compare with FP (needs a GPU).")
def eval_cmd(num_samples, steps, batch_size, quantized, blame, engine_plan, **common):
    """Sample and score: classifier accuracy, FID-proxy, PSNR vs FP; sample grids as PNG."""
    from .stages.evaluate import STAGE_FP, STAGE_QUANT, EvalConfig

    if engine_plan:
        from .stages import engine_checks as ec

        _run_one(common, ec.EVAL_STAGE, ec.EngineCheckConfig(plan=engine_plan, num_samples=num_samples, steps=steps))
        return

    cfg = EvalConfig(num_samples=num_samples, steps=steps, batch_size=batch_size, quantized=quantized, blame=blame)
    _run_one(common, STAGE_QUANT if quantized else STAGE_FP, cfg)


EPILOG_FINETUNE = """\b
Examples:
  questdeploy finetune                          # QuEST W4A8 on the default model (needs calibrate)
  questdeploy finetune --bits w8a8 --method ptq --run-dir runs/w8a8-ptq
  questdeploy finetune --bits w4a4 --groups 20 --tla-iters 80 --cma-iters 80
"""

EPILOG_RUN = """\b
Examples:
  questdeploy run                               # everything on the default model into runs/default
  questdeploy run --model ./my-pipeline --bits w8a8 --target trt --run-dir runs/mine
Stages that are up to date are skipped; an interrupted run resumes where it stopped.
"""


def finetune_options(f):
    """Options of the finetune stage, shared by `finetune` and `run`."""
    for opt in reversed([
        click.option("--bits", default="w4a8", show_default=True, help="Weight/activation bits: w8a8, w4a8, w4a4 (w4a16/w8a16 weight-only)."),
        click.option("--method", type=click.Choice(["quest", "ptq", "full"]), default="quest", show_default=True,
                     help="quest: selective finetuning; ptq: calibration only; full: finetune everything (baseline)."),
        click.option("--target", type=click.Choice(["ort", "trt", "ort-int"]), default="ort", show_default=True,
                     help="Deployment target: ort (onnxruntime), ort-int (the ort quantizers, exported for onnxruntime's "
                          "integer kernels) or trt (TensorRT: signed-only quantizers, constant Q/DQ scales)."),
        click.option("--groups", "num_groups", type=int, default=10, show_default=True,
                     help="Timestep groups (bins over the training timesteps); 1 = one static scale."),
        click.option("--weight-granularity", type=click.Choice(["per_channel", "per_block"]), default="per_channel", show_default=True,
                     help="INT4 weights: per output channel, or block-wise along the input dim (Linear layers)."),
        click.option("--block-size", type=int, default=32, show_default=True, help="Block size for per_block INT4 weights."),
        click.option("--weight-rounding", type=click.Choice(["gptq", "nearest"]), default=_FT.weight_rounding, show_default=True,
                     help="gptq: round weights to minimise each layer's output error on the calibration inputs; nearest: plain rounding."),
        click.option("--w8-budget", type=float, default=_FT.w8_budget, show_default=True,
                     help="At W4: fraction of the weights kept at 8 bits, in the layers that measurably suffer most "
                          "at 4 bits; 0 = every weight 4-bit."),
        click.option("--tla-iters", "tla_iters_per_group", type=int, default=_FT.tla_iters_per_group, show_default=True,
                     help="Time-embedding-aware finetuning iterations per group."),
        click.option("--cma-iters", "cma_iters_per_group", type=int, default=_FT.cma_iters_per_group, show_default=True,
                     help="Attention finetuning iterations per group and epoch."),
        click.option("--cma-epochs", type=int, default=_FT.cma_epochs, show_default=True),
        click.option("--lr-weights", type=float, default=None,
                     help="Weight learning rate [default: 1e-4 for quest, 1e-5 for full]."),
        click.option("--lr-scales", type=float, default=None,
                     help="Activation-scale learning rate [default: 1e-3; 3e-3 with 4-bit activations]."),
        click.option("--w-local", type=float, default=None,
                     help="Weight of the local loss (selected layers' outputs vs FP) next to the global one (weight 2) "
                          "[default: 1; 0 with 4-bit activations]."),
        click.option("--smooth-alpha", type=float, default=None,
                     help="Input smoothing of the ResNet convs (channel ranges moved into the weights), 0..1; "
                          "0 = off [default: 0.85 with 4-bit activations, else off]."),
        click.option("--channel-shift/--no-channel-shift", default=None,
                     help="Centre each input channel of the smoothed ResNet convs per timestep group before their "
                          "4-bit activation quantizer (exported as Sub/Add around the Q/DQ pair; onnxruntime only) "
                          "[default: on with 4-bit activations]."),
        click.option("--device", default=_FT.device, show_default=True,
                     help="Where initialisation and finetuning run: cpu, cuda or cuda:N. The checkpoint is the same "
                          "format either way; GPU numerics differ from the CPU's in the last bits."),
        click.option("--checkpoint-every", type=int, default=_FT.checkpoint_every, show_default=True,
                     help="Iterations between resume points; an interrupted finetune continues from the last one."),
    ]):
        f = opt(f)
    return f


def _finetune_config(**kw):
    return FinetuneConfig(**kw)


@cli.command(epilog=EPILOG_FINETUNE)
@common_options
@finetune_options
def finetune(**ft):
    """Quantize (PTQ init) and selectively finetune with QuEST into a checkpoint (weights + JSON spec)."""
    from .stages.finetune import STAGE

    common = _pop_common(ft)
    _run_one(common, STAGE, _finetune_config(**ft))


@cli.command(epilog=EPILOG_RUN)
@common_options
@finetune_options
@click.option("--calib-steps", type=int, default=25, show_default=True, help="DDIM steps of the calibration trajectory.")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--eval-samples", type=int, default=500, show_default=True)
def run(calib_steps, calib_samples, eval_samples, **ft):
    """Run the whole stage graph, skipping what is up to date and resuming what was interrupted."""
    from .pipeline import run_all

    ctx = _context(**_pop_common(ft))
    with ctx.run.locked():
        ctx.run.bind_model(ctx.model.model_id, ctx.model.path)
        _warn_drift(ctx.run)
        for res in run_all(ctx, finetune=_finetune_config(**ft), target=ft["target"],
                           calib_steps=calib_steps, calib_samples=calib_samples, eval_samples=eval_samples):
            _report(res)
    click.echo(f"run finished: {ctx.run.path}")


_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EDQUOT}


EPILOG_EXPORT = """\b
Examples:
  questdeploy export --onnx                     # ort form: per-timestep scales via Gather inside Q/DQ
  questdeploy export --onnx --target ort-int    # onnxruntime CPU speed: Convs/MatMuls as integer GEMMs
  questdeploy export --onnx --target trt        # TensorRT form: constant Q/DQ scales (finetune with --target trt)
  questdeploy export --onnx --static-scales     # one scale for all timesteps (what other tools ship)
"""

EPILOG_VERIFY = """\b
Examples:
  questdeploy verify                            # exact check, onnxruntime optimizations off
  questdeploy verify --optimization all         # what a serving stack runs, with quantization-step tolerances
  questdeploy verify --per-layer                # find the first quantizer that diverges
  questdeploy verify --engine runs/default/build-engine/model.plan   # TensorRT vs onnxruntime (GPU)
"""

EPILOG_BUILD = """\b
Examples:
  questdeploy build-engine --check-only         # TensorRT rule lint, no GPU needed
  questdeploy build-engine --profile int8 --batch 1:2:8 --triton-repo triton/
  questdeploy build-engine --profile int4 --timing-cache ~/.cache/trt.cache
"""


@cli.command(epilog=EPILOG_EXPORT)
@common_options
@click.option("--onnx", "onnx_flag", is_flag=True, default=True, help="Export to ONNX (the only format; accepted for clarity).")
@click.option("--target", type=click.Choice(["ort", "ort-int", "trt", "fp"]), default="ort", show_default=True,
              help="Graph form: ort (onnxruntime, Q/DQ), ort-int (onnxruntime, Convs and weight MatMuls as integer "
                   "GEMMs: faster on CPU, fixed height/width), trt (TensorRT), fp (the float baseline).")
@click.option("--static-scales", is_flag=True, help="Collapse each per-timestep scale table to one scale (baseline).")
def export(onnx_flag, target, static_scales, **common):
    """Export the finetuned quantized model to ONNX (opset 21) with Q/DQ nodes carrying its scales."""
    from .stages.export import STAGE, ExportConfig

    _run_one(common, STAGE, ExportConfig(target=target, static_scales=static_scales))


@cli.command(epilog=EPILOG_VERIFY)
@common_options
@click.option("--steps", type=int, default=25, show_default=True, help="DDIM steps of the checked trajectory.")
@click.option("--num-samples", type=int, default=4, show_default=True)
@click.option("--optimization", type=click.Choice(["off", "basic", "extended", "all"]), default="off", show_default=True,
              help="onnxruntime graph optimization level; 'off' compares exactly.")
@click.option("--max-rel-l2", type=float, default=None, help="Per-call relative L2 tolerance (default 0.05 with optimizations off, 0.1 optimized).")
@click.option("--min-psnr", "min_psnr_db", type=float, default=None, help="Trajectory PSNR tolerance in dB (default 30 off, 25 optimized).")
@click.option("--per-layer", is_flag=True, help="Also compare every quantizer's output (debugging).")
@click.option("--engine", "engine_plan", default=None, help="Run this TensorRT plan on verify's golden inputs instead (needs a GPU).")
def verify(steps, num_samples, optimization, max_rel_l2, min_psnr_db, per_layer, engine_plan, **common):
    """Prove the ONNX export computes what the PyTorch quantized model computes (onnxruntime + onnx.reference)."""
    from .stages.verify import STAGE, VerifyConfig, raise_if_failed

    if engine_plan:
        from .stages import engine_checks as ec

        cfg = ec.EngineCheckConfig(plan=engine_plan, max_rel_l2=max_rel_l2 if max_rel_l2 is not None else 0.1)
        ec.raise_if_failed(_run_one(common, ec.VERIFY_STAGE, cfg).summary)
        return

    cfg = VerifyConfig(steps=steps, num_samples=num_samples, optimization=optimization, per_layer=per_layer,
                       max_rel_l2=max_rel_l2, min_psnr_db=min_psnr_db)
    raise_if_failed(_run_one(common, STAGE, cfg).summary)


@cli.command(name="build-engine", epilog=EPILOG_BUILD)
@common_options
@click.option("--profile", default="int8", show_default=True, help="int8, int4, fp16 (engines/*.toml) or a .toml path.")
@click.option("--check-only", is_flag=True, help="Only run the TensorRT rule lint (no GPU or TensorRT needed).")
@click.option("--batch", default=None, help="Batch range MIN:OPT:MAX (default from the profile).")
@click.option("--dim", "dims", multiple=True, help="Other dynamic dims, NAME=MIN:OPT:MAX (repeatable).")
@click.option("--opt-level", "optimization_level", type=int, default=None, help="Builder optimization level 0-5.")
@click.option("--workspace-mib", type=int, default=None)
@click.option("--timing-cache", default=None, help="Persistent timing cache file.")
@click.option("--refit", type=click.Choice(["none", "refit", "identical"]), default=None)
@click.option("--strip-weights", is_flag=True, default=None)
@click.option("--triton-repo", default=None, help="Also write a Triton model repository here.")
@click.option("--triton-model", default="quest_unet", show_default=True)
@click.option("--no-polygraphy-lint", is_flag=True, help="Skip `polygraphy check lint`.")
def build_engine(check_only, no_polygraphy_lint, dims, **opts):
    """Lint the exported ONNX for TensorRT, then build an INT8 / INT4 / FP16 engine (needs TensorRT + a GPU)."""
    from .stages.build_engine import STAGE, BuildEngineConfig, raise_if_failed

    common = _pop_common(opts)
    cfg = BuildEngineConfig(check_only=check_only, polygraphy_lint=not no_polygraphy_lint, dims=tuple(dims), **opts)
    raise_if_failed(_run_one(common, STAGE, cfg).summary, check_only)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors end in one line on stderr and a non-zero exit, never a traceback."""
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        cli.main(args=argv, prog_name="questdeploy", standalone_mode=False)
    except QuestDeployError as e:
        _echo(f"error: {e.one_line()}")
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "questdeploy"
        _echo(f"error: {e.format_message()} (see `{cmd} --help`)")
        return 2
    except click.Abort:
        _echo("error: interrupted.")
        return 130
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        _echo(f"error: cannot write{where}: {e.strerror}. Hint: free space / fix permissions, or choose another --run-dir; "
              "finished stages are kept.")
        return 5
    except KeyboardInterrupt:
        _echo("error: interrupted; finished stages are kept, re-run to resume.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
