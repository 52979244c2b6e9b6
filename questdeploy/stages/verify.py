"""Verify stage: the exported ONNX against the PyTorch quantized model, with onnxruntime and onnx.reference.

(a) one UNet call at every sampler timestep (max-abs, relative L2, cosine), (b) the whole DDIM trajectory
from the same noise (final-image PSNR), (c) one call against ``onnx.reference`` (an independent oracle),
(d) with ``--per-layer``, every quantizer's output compared, for debugging; (e) for the ``ort-int`` form, always,
every integer Conv / MatMul teacher-forced against the float64 PyTorch layer (``integer_layers`` in verify.json;
the activation quantizers of that form are the ``ort`` form's, so the teacher-forced quantizer check and (d) run
as usual). Writes ``verify.json``, ``per_timestep_error.png`` and golden I/O in Polygraphy's JSON format
(``golden_inputs.json`` / ``golden_outputs.json``) for ``polygraphy run --trt --load-inputs ... --load-outputs ...``
on a GPU host.

A tolerance breach still records the (complete) report, then fails the command.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from ..errors import ConfigError, VerificationError
from ..quant.quantizers import ActQuantizer
from ..sampling import initial_noise
from .base import Stage, StageContext
from .export import ONNX_NAME, load_quantized


@dataclass
class VerifyConfig:
    steps: int = 25
    num_samples: int = 4
    optimization: str = "off"      # onnxruntime graph optimizations: off = exact comparison; all = what serving runs
    per_layer: bool = False
    max_rel_l2: float | None = None    # None: the default for the optimization level (see export/verify.py)
    min_psnr_db: float | None = None
    tolerances: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.optimization not in ("off", "basic", "extended", "all"):
            raise ConfigError(f"unknown --optimization {self.optimization!r}.", hint="use off, basic, extended or all.")
        if self.steps < 1 or self.num_samples < 1:
            raise ConfigError("--steps and --num-samples must be positive.", hint="e.g. --steps 25 --num-samples 4.")


def load_our_onnx(path: Path) -> onnx.ModelProto:
    """Load the export, refusing a truncated file or one that questdeploy did not write."""
    from ..export.onnx_export import model_info

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a broken file
        raise VerificationError(f"{path} is not a readable ONNX file ({type(e).__name__}).",
                                hint="re-export it: `questdeploy export --force`.") from None
    if not model_info(model):
        raise VerificationError(f"{path} was not written by questdeploy export (no questdeploy metadata).",
                                hint="verify compares our own exports with the checkpoint they came from; export with `questdeploy export`.")
    return model


def reference_runner(path: Path, model: onnx.ModelProto):
    """The ``onnx.reference`` oracle for the export at ``path`` and a note for verify.json (None when it runs the
    file as is). ``onnx.reference`` implements no ``com.microsoft`` op: an ``ort-int`` export written with
    ``MatMulIntegerToFloat`` (static scales) is evaluated with each of those nodes expanded to the standard ops
    it stands for (``MatMulInteger -> Cast -> Mul -> Add``); every other node is the file's own."""
    from ..export.ort_integer import MS_DOMAIN, expand_contrib_ops
    from ..runners.reference import ReferenceRunner

    if not any(n.domain == MS_DOMAIN for n in model.graph.node):
        return ReferenceRunner(str(path), name="onnx.reference"), None
    full = onnx.load(str(path))
    note = ("onnx.reference has no com.microsoft ops: it ran this file with each MatMulIntegerToFloat expanded to "
            "MatMulInteger -> Cast -> Mul -> Add (its definition); all other nodes as exported")
    return ReferenceRunner(expand_contrib_ops(full), name="onnx.reference (contrib ops expanded)"), note


def tolerances_for(cfg: VerifyConfig, act_bits: int = 8):
    """The default bounds for this optimization level and the export's narrowest activation bits; flags override."""
    from ..export.verify import Tolerances

    tol = Tolerances.exact(act_bits) if cfg.optimization == "off" else Tolerances.optimized()
    if cfg.max_rel_l2 is not None:
        tol.call_rel_l2 = tol.reference_rel_l2 = cfg.max_rel_l2
        tol.call_rel_l2_mean = min(tol.call_rel_l2_mean, cfg.max_rel_l2)
    if cfg.min_psnr_db is not None:
        tol.trajectory_psnr_db = cfg.min_psnr_db
    return tol


def execute(ctx: StageContext, cfg: VerifyConfig, out: Path) -> dict:
    from ..export import verify as V
    from ..export.onnx_export import model_info
    from ..runners.onnxrt import OnnxRuntimeRunner
    from ..runners.torch_runner import TorchRunner

    path = ctx.run.stage_dir("export") / ONNX_NAME
    model = load_our_onnx(path)
    qunet = load_quantized(ctx)
    tol = tolerances_for(cfg, min((q.bits for q in qunet.quantizers().values() if isinstance(q, ActQuantizer)), default=8))
    labels = torch.arange(cfg.num_samples)
    cond = ctx.model.conditioner(labels)
    noise = initial_noise(cfg.num_samples, ctx.model.sample_shape, ctx.seed)
    ref = TorchRunner(V.torch_model_for(model, qunet), name="torch")
    test = OnnxRuntimeRunner(str(path), optimization=cfg.optimization, name=f"onnxruntime(opt={cfg.optimization})")
    oracle, oracle_note = reference_runner(path, model)
    with ref, test, oracle:
        report = V.verify_report(ref, test, ctx.model.scheduler_config, noise, cond, cfg.steps, reference=oracle,
                                 tolerances=tol, onnx_path=str(path), qunet=qunet)
        feeds = report.pop("_feeds")
        golden = [test.infer(f) for f in feeds]
        if cfg.per_layer:
            report["per_layer"] = V.per_layer_compare(str(path), qunet, feeds[-1], optimization=cfg.optimization)
    V.save_polygraphy_io(feeds, {test.name: golden}, out / "golden_inputs.json", out / "golden_outputs.json")
    V.plot_per_timestep({test.name: report["per_timestep"]["rows"]}, out / "per_timestep_error.png",
                        title=f"{path.name}: onnxruntime vs PyTorch quantized model")
    if oracle_note and "reference" in report:
        report["reference"]["note"] = oracle_note
    report["form"] = model_info(model).get("form")
    report["config"] = asdict(cfg)
    (out / "verify.json").write_text(json.dumps(V.json_ready(report), indent=2, default=float))
    s = report["per_timestep"]["summary"]
    exact = report.get("exactness") or {}
    integer = report.get("integer_layers") or {}
    return {"passed": report["passed"], "failures": report["failures"], "rel_l2_max": s["rel_l2_max"],
            "rel_l2_mean": s.get("rel_l2_mean"), "quantizer_mismatches": exact.get("mismatches"),
            "cosine_min": s["cosine_min"], "trajectory_psnr_db": report.get("trajectory", {}).get("psnr_db"),
            "reference_rel_l2": (report.get("reference", {}).get("out_sample") or {}).get("rel_l2"),
            "integer_layer_rel_err_max": integer.get("rel_err_max")}


def raise_if_failed(summary: dict) -> None:
    if summary.get("passed") is False:
        raise VerificationError("verify failed: " + "; ".join(summary.get("failures", [])) + ".",
                                hint="see verify/verify.json and per_timestep_error.png; `questdeploy verify --per-layer` finds the first layer that diverges.")


STAGE = Stage("verify", ("export", "finetune"), execute, "check the ONNX numerics against the PyTorch quantized model")
