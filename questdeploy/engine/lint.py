"""TensorRT rule lint for Q/DQ ONNX graphs: what TensorRT will reject or not fuse, found without a GPU.

Each rule is one small function ``rule(ix: GraphIndex) -> list[Finding]`` registered in ``RULES`` with an
id, so a test can break exactly one rule and ``--disable RULE`` can silence one. The rules follow
TensorRT's explicit-quantization contract (``IQuantizeLayer`` / ``IDequantizeLayer`` docs, the ONNX
parser's operator table, the Q/DQ placement guidance); ``../shared/notes/trt-qdq-rules.md`` has the
sources. ``polygraphy check lint`` (onnx.checker + onnxruntime, node by node) runs after the rules and
its entries are folded in.

Severity: ``error`` = TensorRT rejects the graph (or builds something other than asked); ``warning`` =
it builds, but a layer stays in float or a fusion is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto

from .graph import (
    DEFAULT_DOMAINS,
    DEQUANTIZE,
    FLOAT_TYPES,
    FP4_TYPES,
    FP8_TYPES,
    INT4_TYPES,
    LINEAR_OPS,
    QUANTIZE,
    GraphIndex,
    detect_form,
    load_model,
    questdeploy_metadata,
    type_name,
)

ERROR = "error"
WARNING = "warning"

# The ONNX parser of TensorRT 10.x/11.x reads opsets 9..24.
PARSER_MIN_OPSET = 9
PARSER_MAX_OPSET = 24


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "error" | "warning"
    node: str
    message: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LintReport:
    model: str
    form: str
    form_source: str
    opset: int
    findings: list[Finding] = field(default_factory=list)
    polygraphy: dict = field(default_factory=lambda: {"ran": False})
    rules_run: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def verdict(self) -> str:
        if self.errors:
            return f"FAIL: {len(self.errors)} error(s) TensorRT will reject, {len(self.warnings)} warning(s)"
        if self.warnings:
            return f"PASS with {len(self.warnings)} warning(s): TensorRT will build it; see the fusion/precision hints"
        return "PASS: no TensorRT rule broken"

    def by_rule(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = defaultdict(list)
        for f in self.findings:
            out[f.rule].append(f)
        return dict(out)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "form": self.form, "form_source": self.form_source, "opset": self.opset,
            "passed": self.passed, "verdict": self.verdict,
            "counts": {"error": len(self.errors), "warning": len(self.warnings)},
            "rules_run": self.rules_run, "polygraphy": self.polygraphy,
            "findings": [f.to_dict() for f in self.findings],
        }


# --------------------------------------------------------------------------------------------------
# rules

RuleFn = Callable[[GraphIndex], list[Finding]]
RULES: dict[str, tuple[RuleFn, str]] = {}


def rule(rule_id: str, what: str):
    def deco(fn: RuleFn) -> RuleFn:
        RULES[rule_id] = (fn, what)
        fn.rule_id = rule_id
        return fn

    return deco


_TRT_FORM_FIX = "export with `--target trt` (constant Q/DQ scales; the per-timestep scale moves to a Div before Q and a Mul after the layer)"


def _qdq(ix: GraphIndex):
    return list(ix.nodes(QUANTIZE, DEQUANTIZE))


@rule("scale-not-constant", "Q/DQ scale must be a build-time constant (TensorRT 10.0-10.12)")
def rule_scale_not_constant(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in _qdq(ix):
        if len(n.input) < 2 or ix.is_constant(n.input[1]):
            continue
        src = ix.producers.get(n.input[1])
        origin = f"{src.op_type} node '{ix.label(src)}'" if src is not None else f"graph input '{n.input[1]}'"
        out.append(Finding(
            "scale-not-constant", ERROR, ix.label(n),
            f"{n.op_type} scale comes from {origin}, not from a constant: TensorRT 10.0-10.12 reject run-time "
            "Q/DQ scales and later versions do not document INT8 kernels for them (this is the `ort` form).",
            _TRT_FORM_FIX,
        ))
    return out


@rule("zero-point", "Q/DQ zero point must be a constant of zeros (TensorRT is symmetric only)")
def rule_zero_point(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in _qdq(ix):
        if len(n.input) < 3 or not n.input[2]:
            continue
        zp = n.input[2]
        if not ix.is_constant(zp):
            out.append(Finding("zero-point", ERROR, ix.label(n),
                               f"{n.op_type} zero point '{zp}' is computed at run time; TensorRT needs a constant.",
                               "use a constant zero point of 0 (symmetric quantization), or drop the input"))
            continue
        v = ix.const_value(zp)
        if v is not None and np.any(v.astype(np.int64) != 0):
            nz = int(np.count_nonzero(v.astype(np.int64)))
            out.append(Finding("zero-point", ERROR, ix.label(n),
                               f"{n.op_type} zero point '{zp}' has {nz} non-zero value(s) (e.g. {int(v.flat[np.flatnonzero(v)[0]])}); "
                               "TensorRT only does symmetric quantization.",
                               "re-export with int8 and zero point 0 (`--target trt`); uint8 with zero point 128 is the onnxruntime layout"))
    return out


@rule("per-channel-activation", "activation scales must be per-tensor (scalar)")
def rule_per_channel_activation(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in _qdq(ix):
        if not ix.is_activation(n) or len(n.input) < 2:
            continue
        shape = ix.shape(n.input[1])
        blocked = bool(ix.attr(n, "block_size", 0))
        if blocked:
            out.append(Finding("per-channel-activation", ERROR, ix.label(n),
                               f"{n.op_type} on activation '{n.input[0]}' is block-quantized; TensorRT block "
                               "quantization is for weights only.", "use one per-tensor (scalar) scale for activations"))
        elif shape is not None and len(shape) >= 1:
            numel = int(np.prod([d if isinstance(d, int) else 2 for d in shape])) if shape else 1
            if numel > 1:
                out.append(Finding("per-channel-activation", ERROR, ix.label(n),
                                   f"{n.op_type} on activation '{n.input[0]}' has a scale of shape {list(shape)}: "
                                   "TensorRT quantizes activations per tensor only.",
                                   "use a scalar scale (e.g. the max over channels); per-channel scales are for weights (axis = output channel)"))
            else:
                out.append(Finding("per-channel-activation", WARNING, ix.label(n),
                                   f"{n.op_type} on activation '{n.input[0]}' has a 1-element 1-D scale; TensorRT reads "
                                   "any 1-D scale as per-channel.", "store the scale as a scalar (shape [])"))
    return out


@rule("int4-activation", "no INT4 activations in TensorRT (INT4 is weight-only)")
def rule_int4_activation(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in ix.nodes(QUANTIZE):
        t = ix.quantized_type(n)
        if t in INT4_TYPES and ix.is_activation(n):
            out.append(Finding("int4-activation", ERROR, ix.label(n),
                               f"QuantizeLinear to {type_name(t)} on activation '{n.input[0]}': TensorRT has no INT4 "
                               "activations (INT4 is weight-only, W4A16; real 4-bit activations are NVFP4 on Blackwell).",
                               "quantize this activation to int8 (W4A8 -> W4 weights with INT8 or FP16 activations), or use the `ort` form for onnxruntime"))
    return out


@rule("int4-consumer", "INT4 weights may only feed MatMul/Gemm")
def rule_int4_consumer(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in ix.nodes(DEQUANTIZE):
        if ix.quantized_type(n) not in INT4_TYPES or not n.output:
            continue
        bad = [c for c in ix.sinks_through_layout(n.output[0]) if c.op_type not in ("MatMul", "Gemm")]
        names = sorted({f"{c.op_type} '{ix.label(c)}'" for c in bad})
        if n.output[0] in ix.graph_output_names():
            names.append("a graph output")
        if names:
            out.append(Finding("int4-consumer", ERROR, ix.label(n),
                               f"INT4 DequantizeLinear feeds {', '.join(names)}: TensorRT runs INT4 weights only in "
                               "MatMul/Gemm (weight-only, block-quantized).",
                               "quantize this layer's weights to int8 per channel (Conv), or keep it in float"))
    return out


@rule("int8-block", "block quantization only for INT4 (and FP8/FP4 from 10.13), never INT8")
def rule_int8_block(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in _qdq(ix):
        if not ix.attr(n, "block_size", 0):
            continue
        t = ix.quantized_type(n)
        if t in INT4_TYPES or t in FP4_TYPES or t in FP8_TYPES:
            continue
        out.append(Finding("int8-block", ERROR, ix.label(n),
                           f"{n.op_type} is block-quantized (block_size={ix.attr(n, 'block_size')}) with type {type_name(t)}: "
                           "TensorRT supports block quantization for INT4 weights (and FP8/FP4 from 10.13) only.",
                           "use per-channel INT8 weights (axis = output channel), or INT4 blocks"))
    return out


def _needs_opset(ix: GraphIndex) -> list[tuple[int, str, str]]:
    """(opset, feature, node) for each feature the graph uses that needs a minimum opset."""
    needs = []
    for n in _qdq(ix):
        t = ix.quantized_type(n)
        if t in INT4_TYPES:
            needs.append((21, f"{type_name(t)} Q/DQ", ix.label(n)))
        if ix.attr(n, "block_size", 0):
            needs.append((21, "DequantizeLinear block_size", ix.label(n)))
        if t in FP8_TYPES:
            needs.append((19, f"{type_name(t)} Q/DQ", ix.label(n)))
        if t in FP4_TYPES:
            needs.append((23, f"{type_name(t)} Q/DQ", ix.label(n)))
        if ix.attr(n, "output_dtype", 0):
            needs.append((21, "QuantizeLinear output_dtype", ix.label(n)))
        axis_given = any(a.name == "axis" for a in n.attribute)
        scale_shape = ix.shape(n.input[1]) if len(n.input) > 1 else None
        if axis_given or (scale_shape and len(scale_shape) >= 1 and not ix.attr(n, "block_size", 0)):
            needs.append((13, "per-axis Q/DQ (axis)", ix.label(n)))
    for name, t in ix.initializers.items():
        if t.data_type in INT4_TYPES:
            needs.append((21, f"{type_name(t.data_type)} initializer", name))
    return needs


@rule("opset", "the default-domain opset must cover every Q/DQ feature used (13 axis, 19 FP8, 21 INT4/block_size, 23 FP4)")
def rule_opset(ix: GraphIndex) -> list[Finding]:
    out = []
    seen: set[str] = set()
    for need, feature, node in sorted(_needs_opset(ix), key=lambda x: -x[0]):
        if ix.opset < need and feature not in seen:
            seen.add(feature)
            out.append(Finding("opset", ERROR, node,
                               f"{feature} needs opset {need}; the model imports opset {ix.opset}.",
                               f"re-export with opset >= {need} (questdeploy exports opset 21)"))
    if ix.opset and not (PARSER_MIN_OPSET <= ix.opset <= PARSER_MAX_OPSET):
        out.append(Finding("opset", WARNING, "<model>",
                           f"opset {ix.opset} is outside {PARSER_MIN_OPSET}..{PARSER_MAX_OPSET}, the range TensorRT's ONNX parser documents.",
                           "export at opset 21"))
    return out


def _quantized_graph(ix: GraphIndex) -> bool:
    return any(True for _ in ix.nodes(QUANTIZE, DEQUANTIZE))


@rule("unquantized-input", "every Conv/ConvTranspose/MatMul/Gemm input should come through a DequantizeLinear")
def rule_unquantized_input(ix: GraphIndex) -> list[Finding]:
    if not _quantized_graph(ix):
        return []  # a float graph is the FP16 baseline: nothing is expected to be quantized
    out = []
    for n in ix.nodes(*LINEAR_OPS):
        missing = []
        for i, x in enumerate(n.input[:2]):
            if x and not ix.comes_from_dq(x):
                role = "weight" if ix.is_constant(x) else "activation"
                missing.append(f"input {i} ({role} '{x}')")
        if missing:
            out.append(Finding("unquantized-input", WARNING, ix.label(n),
                               f"{n.op_type} has no Q/DQ on {', '.join(missing)}: TensorRT runs this layer in float "
                               "(FP16/FP32), not INT8.",
                               "quantize both inputs (activation per tensor, weight per output channel) if this layer "
                               "should be INT8; time embedding, conv_in/conv_out and shortcuts are usually left float on purpose"))
    return out


def _reaches_linear(ix: GraphIndex, name: str, depth: int = 0) -> tuple[bool, bool]:
    """(comes from a Conv/MatMul/Gemm output, a non-constant Mul sits on the way)."""
    p = ix.producers.get(name)
    if p is None or depth > 6:
        return False, False
    if p.op_type in LINEAR_OPS:
        return True, False
    if p.op_type in ("Add", "Mul", "Div") and len(p.input) == 2:
        a, b = p.input
        data, other = (a, b) if not ix.is_constant(a) else (b, a)
        if p.op_type != "Add" or ix.is_constant(other):
            found, mul = _reaches_linear(ix, data, depth + 1)
            runtime_mul = p.op_type in ("Mul", "Div") and not ix.is_constant(other)
            return found, (mul or runtime_mul) and found
    if p.op_type in ("Reshape", "Transpose", "Identity", "Cast"):
        return _reaches_linear(ix, p.input[0], depth + 1)
    return False, False


@rule("residual-add", "a residual Add after a Conv/MatMul should have a dequantized input for Conv+Add fusion")
def rule_residual_add(ix: GraphIndex) -> list[Finding]:
    if not _quantized_graph(ix):
        return []
    out = []
    for n in ix.nodes("Add"):
        if len(n.input) != 2 or any(ix.is_constant(x) for x in n.input):
            continue  # a bias add, not a residual
        shapes = [ix.shape(x) for x in n.input]
        if all(sh is not None for sh in shapes) and shapes[0] != shapes[1]:
            continue  # a broadcast add (e.g. + time embedding), not a skip connection
        paths = [_reaches_linear(ix, x) for x in n.input]
        if not any(found for found, _ in paths):
            continue
        if any(ix.comes_from_dq(x) for x in n.input):
            continue
        extra = ""
        if any(found and mul for found, mul in paths):
            extra = (" A run-time Mul (the per-timestep rescale of the `trt` form) sits between the layer and this Add, "
                     "which may also keep TensorRT from fusing them; measure on a GPU.")
        out.append(Finding("residual-add", WARNING, ix.label(n),
                           "residual Add of a Conv/MatMul output where neither input comes through a DequantizeLinear: "
                           "TensorRT cannot fuse the Add into the layer's INT8 kernel, so it runs as a separate float op." + extra,
                           "quantize the skip-connection input of the Add (Q/DQ on the residual branch, per tensor); "
                           "the Add's first input decides the fused output precision"))
    return out


_UNSUPPORTED_QOPS = {
    "DynamicQuantizeLinear": "dynamic quantization is not supported by TensorRT's ONNX parser",
    "QLinearConv": "operator-oriented quantization (QLinear*) is not parsed by TensorRT",
    "QLinearMatMul": "operator-oriented quantization (QLinear*) is not parsed by TensorRT",
    "ConvInteger": "integer Conv is not parsed by TensorRT",
    "MatMulInteger": "integer MatMul is not parsed by TensorRT",
}


@rule("custom-domain", "no custom-domain operators (TensorRT has no plugin for them) and no QLinear/Integer ops")
def rule_custom_domain(ix: GraphIndex) -> list[Finding]:
    ort_int = questdeploy_metadata(ix.model).get("form") == "ort-int"  # our onnxruntime-only form: re-export
    out = []
    for n in ix.graph.node:
        if n.domain not in DEFAULT_DOMAINS:
            fix = ("lower the questdeploy marker nodes (the exporter's lowering step) before saving"
                   if n.domain.startswith("questdeploy") else "export with `--target trt`" if ort_int else
                   "save the model without onnxruntime graph optimizations (they create com.microsoft fused ops), "
                   "or provide a TensorRT plugin")
            out.append(Finding("custom-domain", ERROR, ix.label(n),
                               f"{n.op_type} is in custom domain '{n.domain}': TensorRT's ONNX parser has no importer for it.", fix))
        elif n.op_type in _UNSUPPORTED_QOPS:
            out.append(Finding("custom-domain", ERROR, ix.label(n), f"{n.op_type}: {_UNSUPPORTED_QOPS[n.op_type]}.",
                               "export with `--target trt`" if ort_int else
                               "use QuantizeLinear/DequantizeLinear pairs around float Conv/MatMul (QDQ format)"))
    return out


@rule("ort-int-form", "the onnxruntime-only `ort-int` form (integer GEMMs, fixed H/W) is not a TensorRT input")
def rule_ort_int_form(ix: GraphIndex) -> list[Finding]:
    if questdeploy_metadata(ix.model).get("form") != "ort-int":
        return []
    return [Finding("ort-int-form", ERROR, "<model>",
                    "this ONNX is questdeploy's `ort-int` form: Convs and weight MatMuls are im2col + integer GEMMs "
                    "(MatMulInteger / MatMulIntegerToFloat) for onnxruntime's CPU kernels; TensorRT parses neither and "
                    "builds its own INT8 kernels from Q/DQ around float Conv / MatMul.",
                    "export with `--target trt`")]


@rule("uint8-activation", "TensorRT quantizes to INT8, not UINT8")
def rule_uint8_activation(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in _qdq(ix):
        t = ix.quantized_type(n)
        if t != TensorProto.UINT8:
            continue
        if n.op_type == QUANTIZE and ix.is_activation(n):
            out.append(Finding("uint8-activation", ERROR, ix.label(n),
                               f"QuantizeLinear to uint8 on activation '{n.input[0]}': TensorRT's Q/DQ is INT8 "
                               "(uint8 is only for DLA). uint8 with zero point 128 is the onnxruntime (`ort`) layout.",
                               _TRT_FORM_FIX + " (int8, zero point 0)"))
        elif n.op_type == DEQUANTIZE and not ix.is_activation(n):
            out.append(Finding("uint8-activation", ERROR, ix.label(n),
                               f"DequantizeLinear of uint8 weight '{n.input[0]}': TensorRT dequantizes INT8/INT4/FP8/FP4 only.",
                               "store weights as symmetric int8 (zero point 0)"))
    return out


@rule("weight-not-integer", "weights should be stored as integers behind a DequantizeLinear")
def rule_weight_not_integer(ix: GraphIndex) -> list[Finding]:
    out = []
    for n in ix.nodes(QUANTIZE):
        if not ix.is_activation(n) and ix.elem_type(n.input[0]) in FLOAT_TYPES:
            out.append(Finding("weight-not-integer", WARNING, ix.label(n),
                               f"QuantizeLinear of float constant '{n.input[0]}': the weight is stored in float and "
                               "quantized at build time (file as large as FP32).",
                               "store the integer weight as an INT8/INT4 initializer feeding DequantizeLinear"))
    return out


@rule("fp32-compute", "a strongly typed engine keeps the ONNX's float type for every non-quantized layer")
def rule_fp32_compute(ix: GraphIndex) -> list[Finding]:
    if not _quantized_graph(ix):
        return []
    outs = [n for n in ix.nodes(DEQUANTIZE) if n.output and ix.elem_type(n.output[0]) == TensorProto.FLOAT]
    scales = [n for n in ix.nodes(DEQUANTIZE) if len(n.input) > 1 and ix.elem_type(n.input[1]) == TensorProto.FLOAT]
    if not (outs or scales):
        return []
    return [Finding("fp32-compute", WARNING, "<model>",
                    f"{len(scales) or len(outs)} DequantizeLinear node(s) produce float32: in a strongly typed TensorRT "
                    "network every layer that is not INT8 (norms, activations, softmax, residual adds) then runs in FP32, "
                    "not FP16, so the engine can be slower than the FP16 baseline.",
                    "export the trt form in float16 (float16 graph and scales) so the float parts run in FP16")]


# --------------------------------------------------------------------------------------------------
# polygraphy check lint


def run_polygraphy_lint(model_path: str | Path, timeout_s: float = 300.0) -> tuple[dict, list[Finding]]:
    """Run ``polygraphy check lint`` in a subprocess and fold its JSON report into findings.

    onnx.checker entries become errors (the file is not valid ONNX); onnxruntime entries become warnings,
    because an onnxruntime failure can be onnxruntime's own (e.g. its QDQS8ToU8 transformer at opset 21)
    and says nothing certain about TensorRT. When polygraphy itself cannot run (not installed, crashed,
    timed out) the result says so and no finding is added: the TensorRT rules above still stand.
    """
    status: dict = {"ran": False}
    with tempfile.TemporaryDirectory(prefix="qd-lint-") as tmp:
        report_path = Path(tmp) / "lint.json"
        cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
               "check", "lint", str(model_path), "-o", str(report_path)]
        env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            status.update(skipped=f"polygraphy check lint timed out after {timeout_s:.0f} s")
            return status, []
        except OSError as e:
            status.update(skipped=f"could not start polygraphy: {e}")
            return status, []
        if not report_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            status.update(skipped="polygraphy check lint wrote no report (" + (" | ".join(tail) or f"exit {proc.returncode}") + ")")
            return status, []
        try:
            report = json.loads(report_path.read_text())
        except ValueError as e:
            status.update(skipped=f"unreadable polygraphy report: {e}")
            return status, []
    summ = report.get("summary", {}) or {}
    status.update(ran=True, exit_code=proc.returncode, passing_nodes=len(summ.get("passing", []) or []),
                  failing_nodes=list(summ.get("failing", []) or []))
    findings = []
    for entry in report.get("lint_entries", []):
        source = str(entry.get("source", "polygraphy"))
        level = str(entry.get("level", "warning")).lower()
        sev = ERROR if (level == "exception" or level == "error") and "checker" in source.lower() else WARNING
        nodes = entry.get("nodes") or ["<model>"]
        msg = " ".join(str(entry.get("message", "")).split())
        if len(msg) > 600:
            msg = msg[:600] + " ..."
        for node in nodes:
            findings.append(Finding("polygraphy-lint", sev, str(node), f"[{source}] {msg}",
                                    "fix the graph so onnx.checker accepts it" if sev == ERROR else
                                    f"reported by {source}, not by TensorRT: check whether it matters for TensorRT"))
    status["entries"] = len(findings)
    return status, findings


# --------------------------------------------------------------------------------------------------
# entry points


def lint_model(
    model: onnx.ModelProto | str | Path,
    *,
    form: str | None = None,
    disable: Iterable[str] = (),
    only: Iterable[str] | None = None,
    polygraphy: bool = True,
    polygraphy_timeout_s: float = 300.0,
) -> LintReport:
    """Lint ``model`` (a path or a ModelProto) against TensorRT's Q/DQ rules; returns a ``LintReport``.

    ``form`` overrides the detected export form (recorded only; the rules look at the graph).
    ``polygraphy=True`` also runs ``polygraphy check lint`` (needs a path; a ModelProto is written to a
    temporary file first).
    """
    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = load_model(model)
    ix = GraphIndex(proto)
    info = detect_form(proto, override=form, index=ix)
    disable = set(disable)
    unknown = (disable | set(only or ())) - set(RULES) - {"polygraphy-lint"}
    if unknown:
        from .errors import ProfileError

        raise ProfileError(f"unknown lint rule(s): {', '.join(sorted(unknown))}", hint=f"rules: {', '.join(RULES)}")
    selected = [r for r in RULES if (only is None or r in set(only)) and r not in disable]
    report = LintReport(str(path) if path else "<memory>", info.form, info.source, ix.opset, rules_run=selected)
    for rid in selected:
        report.findings.extend(RULES[rid][0](ix))
    if polygraphy and "polygraphy-lint" not in disable and (only is None or "polygraphy-lint" in set(only)):
        if path is None:
            with tempfile.TemporaryDirectory(prefix="qd-lint-") as tmp:
                p = Path(tmp) / "model.onnx"
                onnx.save(proto, str(p))
                status, found = run_polygraphy_lint(p, polygraphy_timeout_s)
        else:
            status, found = run_polygraphy_lint(path, polygraphy_timeout_s)
        report.polygraphy = status
        report.findings.extend(found)
        report.rules_run.append("polygraphy-lint")
    for note in info.notes:
        report.findings.append(Finding("form", WARNING, "<model>", note, "re-export, or pass --form to say which form it is"))
    return report


def format_report(report: LintReport, max_per_rule: int | None = 10, width: int = 100) -> str:
    """Human report: node -> problem -> fix, grouped by rule (errors first), then the verdict."""
    lines = [f"TensorRT lint: {report.model}", f"  form: {report.form} ({report.form_source}), opset {report.opset}"]
    groups = report.by_rule()
    order = sorted(groups, key=lambda r: (0 if any(f.severity == ERROR for f in groups[r]) else 1, r))
    wrap = lambda s, ind: textwrap.fill(s, width=width, initial_indent=ind, subsequent_indent=ind + "  ")  # noqa: E731
    for rid in order:
        items = groups[rid]
        sev = Counter(f.severity for f in items)
        what = RULES[rid][1] if rid in RULES else ("polygraphy check lint" if rid == "polygraphy-lint" else rid)
        lines.append("")
        lines.append(f"[{rid}] {what}: " + ", ".join(f"{n} {s}(s)" for s, n in sorted(sev.items())))
        shown = items if max_per_rule is None else items[:max_per_rule]
        for f in shown:
            lines.append(wrap(f"{f.severity.upper():7s} {f.node}", "  "))
            lines.append(wrap(f"problem: {f.message}", "      "))
            lines.append(wrap(f"fix:     {f.fix}", "      "))
        if len(shown) < len(items):
            lines.append(f"  ... and {len(items) - len(shown)} more ({rid})")
    pg = report.polygraphy
    if pg.get("ran"):
        lines.append("")
        lines.append(f"polygraphy check lint: ran, {pg.get('entries', 0)} entr(ies)")
    elif pg.get("skipped"):
        lines.append("")
        lines.append(f"polygraphy check lint: skipped ({pg['skipped']})")
    lines.append("")
    lines.append(f"verdict: {report.verdict}")
    return "\n".join(lines)


def print_report(report: LintReport, file=None, **kw) -> None:
    print(format_report(report, **kw), file=file or sys.stdout)
