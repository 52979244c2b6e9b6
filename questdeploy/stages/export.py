"""Export stage: finetune checkpoint -> ``export/model.onnx`` (opset 21, standard ops, Q/DQ form per target).

``ort``: per-timestep scales read by Gather inside Q/DQ (onnxruntime fuses it into QLinear ops).
``ort-int``: the ``ort`` form with every quantized Conv / weight MatMul as an integer GEMM (im2col +
         MatMulInteger): onnxruntime's fast CPU form; height and width are fixed (export/ort_integer.py).
``trt``: constant Q/DQ scales, the per-timestep scale in a Mul before Q and after the layer (TensorRT).
``fp``:  the unquantized float graph (the baseline engines and benchmarks compare against).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import Stage, StageContext

ONNX_NAME = "model.onnx"
TARGETS = ("ort", "ort-int", "trt", "fp")


@dataclass
class ExportConfig:
    target: str = "ort"
    static_scales: bool = False

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError(f"unknown --target {self.target!r}.", hint="use ort (onnxruntime), ort-int (onnxruntime, integer Conv/MatMul kernels), trt (TensorRT) or fp.")
        if self.static_scales and self.target == "fp":
            raise ConfigError("--static-scales has no meaning for --target fp.", hint="drop it, or export ort / trt.")


def example_inputs(ctx: StageContext, batch: int = 2) -> dict[str, torch.Tensor]:
    """Real-shaped trace inputs: two samples with the model's own conditioning (its true sequence length)."""
    g = torch.Generator().manual_seed(ctx.seed)
    feed = {"sample": torch.randn((batch, *ctx.model.sample_shape), generator=g),
            "timestep": torch.full((batch,), 500.0)}
    cond = ctx.model.conditioner(torch.arange(batch))
    if cond is not None:
        feed["encoder_hidden_states"] = cond
    return feed


def load_quantized(ctx: StageContext):
    from ..quant.spec import load_checkpoint

    return load_checkpoint(ctx.model.unet, ctx.run.stage_dir("finetune") / "checkpoint").eval()


def execute(ctx: StageContext, cfg: ExportConfig, out: Path) -> dict:
    from ..export.onnx_export import export_onnx

    if cfg.target == "fp":
        model = ctx.model.unet
    else:
        model = load_quantized(ctx)
        trained_for = model.quant_config.target
        if cfg.target == "trt" and trained_for != "trt":
            raise ConfigError(
                f"the checkpoint was finetuned for target '{trained_for}' (unsigned softmax quantizers), "
                "which TensorRT cannot run.",
                hint="re-run `questdeploy finetune --target trt --force` (or `questdeploy run --target trt`).",
            )
    res = export_onnx(model, out / ONNX_NAME, target=cfg.target, static_scales=cfg.static_scales,
                      example_inputs=example_inputs(ctx))
    info = res.to_dict()
    info["path"] = ONNX_NAME
    (out / "export.json").write_text(json.dumps(info, indent=2, default=str))
    return {"target": cfg.target, "static_scales": cfg.static_scales, "onnx": str(ctx.run.stage_dir("export") / ONNX_NAME),
            "bytes": res.bytes}


STAGE = Stage("export", ("finetune",), execute, "export the quantized model to ONNX with Q/DQ")
