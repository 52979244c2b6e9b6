"""The ``questdeploy`` command line: parse options, call the library, turn its errors into one line.

Nothing here computes anything; each command builds a stage config and calls ``run_stage``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import QuestDeployError

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
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _context(run_dir: Path, model: str | None, conditioning: Path | None, seed: int, force: bool, quiet: bool):
    from .models import load_model
    from .runfolder import RunFolder
    from .stages.base import StageContext

    loaded = load_model(model, conditioning)
    run = RunFolder(run_dir)
    return StageContext(run=run, model=loaded, seed=seed, progress=not quiet, force=force, log=_echo)


def _run_one(common: dict, stage, config) -> None:
    from .stages.base import run_stage

    ctx = _context(**common)
    with ctx.run.locked():
        ctx.run.bind_model(ctx.model.model_id, ctx.model.path)
        _warn_drift(ctx.run)
        res = run_stage(ctx, stage, config)
    _report(res)


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
"""

EPILOG_EVAL = """\b
Examples:
  questdeploy eval                              # FP model: 500 samples, accuracy, FID-proxy, grid PNG
  questdeploy eval --quantized --run-dir runs/w4a8
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
@click.option("--steps", type=int, default=25, show_default=True, help="DDIM steps of the recorded trajectory.")
@click.option("--num-samples", type=int, default=128, show_default=True, help="Trajectories (samples per step).")
@click.option("--batch-size", type=int, default=128, show_default=True)
def calibrate(steps, num_samples, batch_size, **common):
    """Record the FP model's own sampling trajectory as calibration data."""
    from .stages.calibrate import STAGE, CalibrateConfig

    _run_one(common, STAGE, CalibrateConfig(steps=steps, num_samples=num_samples, batch_size=batch_size))


@cli.command(name="eval", epilog=EPILOG_EVAL)
@common_options
@click.option("--num-samples", type=int, default=500, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True, help="DDIM steps.")
@click.option("--batch-size", type=int, default=250, show_default=True)
@click.option("--quantized", is_flag=True, help="Also sample the finetuned quantized model and compare with FP.")
def eval_cmd(num_samples, steps, batch_size, quantized, **common):
    """Sample and score: classifier accuracy, FID-proxy, PSNR vs FP; sample grids as PNG."""
    from .stages.evaluate import STAGE_FP, STAGE_QUANT, EvalConfig

    cfg = EvalConfig(num_samples=num_samples, steps=steps, batch_size=batch_size, quantized=quantized)
    _run_one(common, STAGE_QUANT if quantized else STAGE_FP, cfg)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors end in one line on stderr and a non-zero exit, never a traceback."""
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
    except KeyboardInterrupt:
        _echo("error: interrupted; finished stages are kept, re-run to resume.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
