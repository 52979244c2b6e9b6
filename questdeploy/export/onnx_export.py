"""Export a (quantized) diffusers UNet to ONNX: float graph, ``ort`` / ``trt`` Q/DQ forms, static scales.

Pipeline (each step usable alone):

1. ``trace(model)`` -> ``MarkedGraph``: ``torch.onnx.export(dynamo=True, opset 21)`` of the model with the
   quantizers' export hook active, so every enabled quantizer leaves a marker node (``markers.py``).
   This is the only slow step (torch.export); trace once, lower many times.
2. ``lower_marked(marked, target, ...)`` -> ``(onnx.ModelProto, LowerReport)``: the requested form
   (``qdq.py`` documents the forms; ``ort-int`` is the ``ort`` form passed through ``ort_integer.integerize``). The quantizer parameters are read from the traced model or from
   any model with the same quantizer names (``params_from=``), e.g. a W4A8 sibling of a W8A8 trace.
3. ``save_onnx(proto, path)``: atomic write; tensors go to one external data file when the model would
   exceed protobuf's 2 GB limit. ``check_onnx(path)`` runs ``onnx.checker`` with ``full_check=True``.

``export_onnx`` runs all three.

Graph I/O (documented choice)
-----------------------------
Inputs ``sample`` (float32, ``[batch, C, H, W]``), ``timestep`` (float32, ``[n]``: one value or one per
batch element; all must be equal, the graph uses element 0, as ``QuantizedUNet`` does) and, for
``UNet2DConditionModel`` only, ``encoder_hidden_states`` (float32, ``[batch, sequence, D]``). Output
``out_sample`` (float32, ``[batch, C, H, W]``). These are the names of diffusers' ONNX export script and
of diffusers' / Optimum's onnxruntime pipelines (``OnnxStableDiffusionPipeline`` feeds ``sample``,
``timestep``, ``encoder_hidden_states`` and reads output 0). TensorRT's ``demo/Diffusion`` uses the same
input names but calls the output ``latent`` and a static ``timestep`` of shape ``[1]``; its engines are
built from its own export, and an engine built from ours just binds ``out_sample``. ``batch`` and
``sequence`` are dynamic axes; H and W are fixed to the traced size.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from questdeploy.errors import QuestDeployError

from . import markers
from .ort_integer import FORM as INTEGER_FORM
from .ort_integer import integerize
from .qdq import FORMS, LowerReport, get_metadata, lower, params_from_model

INPUT_SAMPLE = "sample"
INPUT_TIMESTEP = "timestep"
INPUT_CONTEXT = "encoder_hidden_states"
OUTPUT = "out_sample"
TARGETS = FORMS + (INTEGER_FORM,)  # "fp", "ort", "trt", "ort-int"
DEFAULT_OPSET = 21
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of tensor data; protobuf's hard limit is 2 GiB


class ExportError(QuestDeployError):
    """The model cannot be exported as asked."""


# --------------------------------------------------------------------------------------------------
# model introspection


def _is_quantized(model: nn.Module) -> bool:
    return hasattr(model, "quantizers") and hasattr(model, "bins") and hasattr(model, "unet")


def _base_unet(model: nn.Module) -> nn.Module:
    return model.unet if _is_quantized(model) else model


def is_conditional(model: nn.Module) -> bool:
    """True for UNets that take ``encoder_hidden_states`` (``UNet2DConditionModel``)."""
    if _is_quantized(model) and hasattr(model, "_conditional"):
        return bool(model._conditional)
    return "encoder_hidden_states" in inspect.signature(_base_unet(model).forward).parameters


def example_inputs_for(model: nn.Module, batch_size: int = 2, seq_len: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random example inputs shaped from the UNet's config (``sample_size``, ``in_channels``, ``cross_attention_dim``)."""
    cfg = _base_unet(model).config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(seed)
    feed = {
        INPUT_SAMPLE: torch.randn(batch_size, cfg.in_channels, h, w, generator=g),
        INPUT_TIMESTEP: torch.full((batch_size,), 500.0),
    }
    if is_conditional(model):
        feed[INPUT_CONTEXT] = torch.randn(batch_size, seq_len, cfg.cross_attention_dim, generator=g)
    return feed


class _ExportWrapper(nn.Module):
    """Fixed signature for tracing: one shared timestep (element 0), tensor output."""

    def __init__(self, model: nn.Module, conditional: bool):
        super().__init__()
        self.model = model
        self.conditional = conditional
        self.quantized = _is_quantized(model)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        t = timestep.reshape(-1)[:1]
        kwargs = {"encoder_hidden_states": encoder_hidden_states} if self.conditional else {}
        if self.quantized:
            return self.model(sample, t, **kwargs)
        return self.model(sample, t, return_dict=False, **kwargs)[0]


# --------------------------------------------------------------------------------------------------
# step 1: trace


@dataclass
class MarkedGraph:
    """The float graph with one marker node per enabled quantizer (not a valid file to ship)."""

    model: onnx.ModelProto
    quantizers: dict[str, nn.Module]
    timestep_edges: list[float] | None
    conditional: bool
    input_names: list[str]
    spec_json: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def marker_keys(self) -> list[str]:
        return [
            next(a.s.decode() for a in n.attribute if a.name == markers.MARKER_ATTR)
            for n in self.model.graph.node
            if n.domain == markers.MARKER_DOMAIN
        ]


def trace(
    model: nn.Module,
    *,
    example_inputs: dict[str, torch.Tensor] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
) -> MarkedGraph:
    """Trace ``model`` (a ``QuantizedUNet`` or a float diffusers UNet) into a ``MarkedGraph``."""
    if opset < 21:
        raise ExportError(
            f"opset {opset} is too old for the Q/DQ forms",
            hint="use opset 21 or newer (INT4 and DequantizeLinear(block_size) need 21; onnx.reference needs >= 19)",
        )
    conditional = is_conditional(model)
    feed = dict(example_inputs) if example_inputs is not None else example_inputs_for(model)
    names = [INPUT_SAMPLE, INPUT_TIMESTEP] + ([INPUT_CONTEXT] if conditional else [])
    missing = [n for n in names if n not in feed]
    if missing:
        raise ExportError(f"example inputs lack {missing}", hint=f"pass a dict with keys {names}")
    feed[INPUT_TIMESTEP] = torch.as_tensor(feed[INPUT_TIMESTEP], dtype=torch.float32).reshape(-1)
    if feed[INPUT_TIMESTEP].numel() < 2:  # avoid torch.export's 0/1 specialisation of the dynamic length
        feed[INPUT_TIMESTEP] = feed[INPUT_TIMESTEP][:1].repeat(2)
    if dynamic_batch and feed[INPUT_SAMPLE].shape[0] < 2:
        raise ExportError("example batch must be >= 2 for a dynamic batch axis", hint="use batch_size=2 example inputs")
    args = tuple(feed[n] for n in names)
    batch = torch.export.Dim("batch", min=1, max=4096) if dynamic_batch else None
    dyn: dict = {
        "sample": {0: batch} if batch is not None else {},
        "timestep": {0: torch.export.Dim("timestep_len", min=1, max=4096)},
    }
    if conditional:
        ctx = {}
        if batch is not None:
            ctx[0] = batch
        if dynamic_sequence:
            ctx[1] = torch.export.Dim("sequence", min=1, max=4096)
        dyn["encoder_hidden_states"] = ctx
    wrapper = _ExportWrapper(model, conditional).eval()
    quant = _is_quantized(model)
    record = markers.MarkerRecord()
    table = markers.translation_table()
    with warnings.catch_warnings(), _quiet_torch_onnx(), torch.no_grad():
        warnings.simplefilter("ignore")
        ctx_mgr = markers.marking(record) if quant else _nullcontext()
        with ctx_mgr:
            try:
                prog = torch.onnx.export(
                    wrapper, args, dynamo=True, opset_version=opset, input_names=names, output_names=[OUTPUT],
                    dynamic_shapes=dyn, custom_translation_table=table, optimize=True, verbose=False, report=False,
                )
            except Exception as e:  # torch's exporter raises many types; keep the chain
                raise ExportError(
                    f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    hint="check that the model runs in PyTorch with these example inputs; see the chained traceback",
                ) from e
    proto = prog.model_proto
    spec_json = None
    edges = None
    if quant:
        edges = [float(e) for e in model.bins.edges]
        try:
            spec_json = model.spec().to_json(indent=None)
        except Exception:  # a spec that cannot be written must not block export; lowering reads the modules
            spec_json = None
    return MarkedGraph(proto, dict(record.quantizers), edges, conditional, names, spec_json, list(record.skipped))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


class _quiet_torch_onnx:
    """Silence torch.onnx's progress prints and registry warnings (stdout + its loggers)."""

    def __enter__(self):
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *a):
        for name, lvl in self._levels.items():
            logging.getLogger(name).setLevel(lvl)
        self._redirect.__exit__(*a)
        return False


# --------------------------------------------------------------------------------------------------
# step 2: lower


def lower_marked(
    marked: MarkedGraph,
    target: str,
    *,
    static_scales: bool = False,
    static_reduce: str = "max",
    params_from: nn.Module | dict | None = None,
) -> tuple[onnx.ModelProto, LowerReport]:
    """Lower a ``MarkedGraph`` into ``target`` ("fp" | "ort" | "trt" | "ort-int").

    ``ort-int``: the ``ort`` form, then every quantized Conv / weight MatMul rewritten as an integer GEMM
    (``ort_integer.integerize``; the report's ``integer`` entry says what was rewritten and what was kept).

    ``params_from``: a ``QuantizedUNet`` (or ``{name: quantizer}``) whose quantizers replace the traced
    ones, by name: lets one trace serve W8A8 / W4A8 / W4A4 models of the same architecture.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}", hint=f"use one of {list(TARGETS)}")
    quantizers = dict(marked.quantizers)
    edges = marked.timestep_edges
    spec_json = marked.spec_json
    if params_from is not None:
        other = params_from.quantizers() if hasattr(params_from, "quantizers") else dict(params_from)
        missing = sorted(set(quantizers) - set(other))
        if missing:
            raise ExportError(
                f"params_from lacks {len(missing)} traced quantizer(s), e.g. {missing[:3]}",
                hint="params_from must have the same quantizer names as the traced model",
            )
        extra = sorted(k for k, q in other.items() if getattr(q, "enabled", True) and k not in quantizers)
        if extra:
            raise ExportError(
                f"params_from has {len(extra)} enabled quantizer(s) the trace has no marker for, e.g. {extra[:3]}",
                hint="trace the model with those quantizers enabled",
            )
        quantizers = {k: other[k] for k in quantizers}
        if hasattr(params_from, "bins"):
            edges = [float(e) for e in params_from.bins.edges]
        if hasattr(params_from, "spec"):
            try:
                spec_json = params_from.spec().to_json(indent=None)
            except Exception:
                spec_json = None
    meta = {"io": json.dumps({"inputs": marked.input_names, "outputs": [OUTPUT]})}
    if spec_json and target != "fp":
        meta["quant_spec"] = spec_json
    proto, report = lower(
        marked.model, params_from_model(quantizers), "ort" if target == INTEGER_FORM else target, timestep_edges=edges,
        static_scales=static_scales, static_reduce=static_reduce, timestep_input=INPUT_TIMESTEP, metadata=meta,
    )
    if target == INTEGER_FORM:
        proto, integer = integerize(proto)
        report.form, report.integer = INTEGER_FORM, integer.to_dict()
    return proto, report


# --------------------------------------------------------------------------------------------------
# step 3: save / check


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data (raw or typed fields), without serializing the model."""
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            total += n * 4
    return total


def save_onnx(model: onnx.ModelProto, path, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; ``external_data=None`` chooses it when the model nears 2 GB.

    With external data all tensors go to ``<name>.data`` next to the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = tensor_bytes(model) > _EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp = tmpdir / path.name
        if external_data:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            onnx.save_model(m, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, path.parent / f.name)
        stale = path.parent / (path.name + ".data")
        if not external_data and stale.exists():
            stale.unlink()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def check_onnx(path) -> None:
    """``onnx.checker.check_model(path, full_check=True)`` (path-based: works with external data)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path} fails onnx.checker: {str(e).splitlines()[0][:300]}",
                          hint="this is a bug in the exporter; please report it with the model config") from e


def file_size(path) -> int:
    """Size of an ONNX file including its external data file, if any."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# --------------------------------------------------------------------------------------------------
# all three


@dataclass
class ExportResult:
    path: Path
    target: str
    static_scales: bool
    report: LowerReport
    bytes: int
    external_data: bool
    input_names: list[str]
    output_names: list[str]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "target": self.target, "static_scales": self.static_scales, "bytes": self.bytes,
            "external_data": self.external_data, "inputs": self.input_names, "outputs": self.output_names,
            "lowering": self.report.to_dict(),
        }


def export_onnx(
    model: nn.Module,
    out_path,
    target: str = "ort",
    static_scales: bool = False,
    *,
    opset: int = DEFAULT_OPSET,
    example_inputs: dict[str, torch.Tensor] | None = None,
    static_reduce: str = "max",
    external_data: bool | None = None,
    check: bool = True,
    marked: MarkedGraph | None = None,
) -> ExportResult:
    """Export ``model`` (``QuantizedUNet`` or float diffusers UNet) to ``out_path`` in ``target`` form.

    ``target``: ``"fp"`` (float graph), ``"ort"`` (Q/DQ with in-graph per-timestep scales, uint8
    activations), ``"ort-int"`` (the ``ort`` form with Convs / weight MatMuls as integer GEMMs: onnxruntime's
    fast CPU form; fixed height and width), ``"trt"`` (constant Q/DQ scales, per-timestep scale outside the pair, int8);
    ``static_scales``: one scale per activation quantizer (``static_reduce`` over groups).
    A float UNet exports only as ``"fp"``. ``marked``: reuse an earlier ``trace`` of this model.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}", hint=f"use one of {list(TARGETS)}")
    if target != "fp" and not _is_quantized(model) and marked is None:
        raise ExportError(
            f"target {target!r} needs a quantized model, got a float {type(model).__name__}",
            hint="quantize it first (questdeploy.quant.quantize_unet / a finetune checkpoint), or use target='fp'",
        )
    if marked is None:
        marked = trace(model, example_inputs=example_inputs, opset=opset)
    proto, report = lower_marked(marked, target, static_scales=static_scales, static_reduce=static_reduce,
                                 params_from=model if (_is_quantized(model) and marked.quantizers) else None)
    if external_data is None:
        external_data = tensor_bytes(proto) > _EXTERNAL_DATA_THRESHOLD
    path = save_onnx(proto, out_path, external_data=external_data)
    if check:
        check_onnx(path)
    return ExportResult(path, target, static_scales, report, file_size(path), external_data,
                        list(marked.input_names), [OUTPUT])


def model_info(path_or_model) -> dict[str, str]:
    """The ``questdeploy.*`` metadata of an exported file or ModelProto."""
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model), load_external_data=False)
    return get_metadata(m)
