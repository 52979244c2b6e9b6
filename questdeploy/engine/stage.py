"""``questdeploy build-engine``: lint -> (stop here with --check-only) -> TensorRT build -> engine.json -> Triton repo.

The order matters for users without a GPU: the lint always runs first and its report is written to the
output folder, then the equivalent ``trtexec`` / ``polygraphy convert`` command lines are written
(``build_commands.sh``), and only then is TensorRT imported, so a CPU machine gets everything that can be
had without TensorRT plus a typed error that says what is missing.

Files written into ``out_dir``: ``lint.txt`` (the human report), ``lint.json``, ``build_commands.sh``, and
after a build ``model.plan`` + ``engine.json`` (and ``<triton_repo>/<model>/...`` when asked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable

from ..runfolder import write_text_atomic
from .builder import (
    BuildOptions,
    build_engine,
    command_line,
    import_tensorrt,
    polygraphy_convert_command,
    require_cuda_device,
    trtexec_command,
)
from .errors import LintFailedError, WrongOnnxFormError
from .graph import INT4_TYPES, GraphIndex, detect_form, load_model
from .lint import ERROR, Finding, LintReport, format_report, lint_model
from .manifest import build_manifest, write_manifest
from .profiles import BuildProfile, load_profile, parse_dim_overrides, parse_range

PLAN_NAME = "model.plan"


def profile_findings(ix: GraphIndex, form: str, profile: BuildProfile) -> list[Finding]:
    """Does the graph match what the profile says it should be (form, INT4 weights, INT8 activations)?"""
    out = []
    qdq = list(ix.nodes("QuantizeLinear", "DequantizeLinear"))
    int4 = [n for n in qdq if n.op_type == "DequantizeLinear" and ix.quantized_type(n) in INT4_TYPES]
    act_q = [n for n in qdq if n.op_type == "QuantizeLinear" and ix.is_activation(n)]
    where = f"profile '{profile.name}'"
    if form == "ort":
        out.append(Finding("profile", ERROR, "<model>",
                           "this ONNX is in the `ort` form (per-timestep scales read by Gather inside Q/DQ): "
                           "TensorRT needs build-time constant Q/DQ scales.",
                           "export with `--target trt` and build that file"))
    elif form == "ort-int":
        out.append(Finding("profile", ERROR, "<model>",
                           "this ONNX is in the onnxruntime-only `ort-int` form (integer GEMMs, im2col baked for one "
                           "size): TensorRT builds engines from Q/DQ around float Conv / MatMul.",
                           "export with `--target trt` and build that file"))
    if profile.form == "fp" and qdq:
        out.append(Finding("profile", ERROR, "<model>", f"{where} builds the float baseline but the graph has {len(qdq)} Q/DQ node(s).",
                           "build a quantized export with --profile int8 / int4, or give the `--target fp` export"))
    if profile.form == "trt" and not qdq:
        out.append(Finding("profile", ERROR, "<model>", f"{where} expects a Q/DQ graph but this ONNX has no Q/DQ nodes.",
                           "export with `--target trt`, or use --profile fp16 for the float graph"))
    if qdq and profile.weight_bits == 4 and not int4:
        out.append(Finding("profile", ERROR, "<model>", f"{where} expects INT4 block-quantized MatMul/Gemm weights; the graph has none.",
                           "export with 4-bit weights (W4A8) or use --profile int8"))
    if qdq and profile.weight_bits == 8 and int4:
        out.append(Finding("profile", ERROR, ix.label(int4[0]), f"{where} is W8 but the graph has {len(int4)} INT4 weight(s).",
                           "use --profile int4"))
    if qdq and profile.act_bits == 8 and not act_q:
        out.append(Finding("profile", ERROR, "<model>", f"{where} expects INT8 activations; the graph quantizes none.",
                           "export with 8-bit activations, or set act_bits = 0 in the profile (weight-only)"))
    return out


def build_engine_stage(
    onnx_path: str | Path,
    out_dir: str | Path,
    profile: str | Path | BuildProfile = "int8",
    *,
    check_only: bool = False,
    triton_repo: str | Path | None = None,
    triton_model: str = "quest_unet",
    batch: str | None = None,
    dims: Iterable[str] | dict | None = None,
    form: str | None = None,
    optimization_level: int | None = None,
    workspace_mib: int | None = None,
    timing_cache: str | Path | None = None,
    refit: str | None = None,
    strip_weights: bool | None = None,
    disable_rules: Iterable[str] = (),
    polygraphy_lint: bool = True,
    device: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Lint ``onnx_path`` for TensorRT, then (unless ``check_only``) build ``out_dir/model.plan``.

    Returns a summary dict: ``lint`` (passed, counts, findings), ``commands`` (trtexec / polygraphy lines),
    ``files``; after a build also ``plan``, ``manifest``, ``build`` and ``triton``. With ``check_only`` it
    returns after the lint whatever the verdict (the caller maps ``lint.passed = False`` to a failing exit).

    Raises, after the lint report and the command lines are on disk: ``WrongOnnxFormError`` (``ort`` / ``ort-int`` form),
    ``LintFailedError`` (TensorRT rule errors), ``TensorRTNotInstalledError``, ``NoCudaDeviceError``,
    ``EngineBuildError``; ``ProfileError`` for bad profile / --batch / --dim values (before anything runs).
    """
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    prof = profile if isinstance(profile, BuildProfile) else load_profile(profile)
    dim_over = dims if isinstance(dims, dict) else parse_dim_overrides(dims)
    prof = prof.with_overrides(
        batch=parse_range(batch) if batch is not None else None, dims=dim_over,
        optimization_level=optimization_level, workspace_mib=workspace_mib, refit=refit, strip_weights=strip_weights,
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. lint (always first)
    model = load_model(onnx_path)
    report: LintReport = lint_model(onnx_path, form=form, disable=disable_rules, polygraphy=polygraphy_lint)
    ix = GraphIndex(model, infer_shapes=False)
    info = detect_form(model, override=form, index=ix)
    if "profile" not in set(disable_rules):
        report.findings[:0] = profile_findings(ix, info.form, prof)
    text = format_report(report)
    log(text)
    write_text_atomic(out_dir / "lint.txt", text + "\n")
    write_text_atomic(out_dir / "lint.json", json.dumps(report.to_dict(), indent=2) + "\n")

    # 2. the same build as command lines (no TensorRT needed)
    plan_path = out_dir / PLAN_NAME
    cache_path = Path(timing_cache) if timing_cache else None
    trt_version, sm = "unknown", "unknown"
    opts = BuildOptions.from_profile(onnx_path, plan_path, prof, timing_cache=cache_path, progress=progress)
    if cache_path is None and prof.timing_cache:
        opts.timing_cache = prof.timing_cache_path(trt_version, sm)
    cmds = {"trtexec": command_line(trtexec_command(opts)), "polygraphy": command_line(polygraphy_convert_command(opts))}
    write_text_atomic(out_dir / "build_commands.sh", "\n".join([
        "#!/bin/sh",
        f"# Rebuild {PLAN_NAME} by hand (profile '{prof.name}'); either line builds the same engine.",
        "# Run on the GPU that will serve the engine, with the TensorRT version it will run under.",
        cmds["trtexec"], "", "# or", "# " + cmds["polygraphy"], "",
    ]))
    summary = {
        "onnx": str(onnx_path), "form": info.form, "profile": prof.to_dict(), "lint": report.to_dict(),
        "commands": cmds, "files": {"lint": str(out_dir / "lint.txt"), "commands": str(out_dir / "build_commands.sh")},
        "check_only": check_only,
    }
    if check_only:
        return summary

    # 3. refuse what TensorRT would refuse, then look for TensorRT
    if info.form == "ort":
        raise WrongOnnxFormError(
            f"{onnx_path} is in the `ort` form (Q/DQ scales read at run time by Gather): TensorRT needs build-time "
            f"constant scales ({report.form_source} says so; lint report in {out_dir / 'lint.txt'}).",
            hint="export with `--target trt` and build that file",
        )
    if info.form == "ort-int":
        raise WrongOnnxFormError(
            f"{onnx_path} is in the onnxruntime-only `ort-int` form (integer GEMMs for onnxruntime's CPU kernels): "
            f"TensorRT cannot build it ({report.form_source} says so; lint report in {out_dir / 'lint.txt'}).",
            hint="export with `--target trt` and build that file",
        )
    if not report.passed:
        raise LintFailedError(
            f"the TensorRT lint found {len(report.errors)} error(s) in {onnx_path}; the build did not start "
            f"(report above and in {out_dir / 'lint.txt'}).",
            hint="fix the nodes it names (each finding has a fix), or re-export with `--target trt`",
            report=report,
        )
    trt = import_tensorrt()
    dev = require_cuda_device(device)
    if cache_path is None and prof.timing_cache:
        opts.timing_cache = prof.timing_cache_path(trt.__version__, dev.sm)
        opts.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    info_build = build_engine(opts, device=device, log=lambda s: print(s, file=sys.stderr))
    manifest = build_manifest(onnx_path, plan_path, build_info=info_build, profile=prof.to_dict(),
                              lint={"passed": report.passed, "warnings": len(report.warnings)})
    mpath = write_manifest(manifest, plan_path)
    summary.update(plan=str(plan_path), manifest=str(mpath), build=info_build)
    summary["files"].update(plan=str(plan_path), manifest=str(mpath))
    if triton_repo is not None:
        from .triton import write_triton_repo

        model_dir = write_triton_repo(triton_repo, triton_model, onnx_path, plan_path, manifest)
        summary["triton"] = str(model_dir)
    return summary
