"""ONNX export of (quantized) diffusers UNets and its numerical verification.

``export_onnx(model, path, target="ort"|"ort-int"|"trt"|"fp", static_scales=False)`` writes an opset-21
file (standard ops; ``ort-int`` with static scales uses onnxruntime's ``MatMulIntegerToFloat``);
``trace`` / ``lower_marked`` / ``save_onnx`` are its steps (trace once, lower many forms).
``verify`` compares an exported file against PyTorch (per timestep, trajectory, per layer).
"""

from .onnx_export import (
    DEFAULT_OPSET,
    INPUT_CONTEXT,
    INPUT_SAMPLE,
    INPUT_TIMESTEP,
    OUTPUT,
    TARGETS,
    ExportError,
    ExportResult,
    MarkedGraph,
    check_onnx,
    example_inputs_for,
    export_onnx,
    file_size,
    lower_marked,
    model_info,
    save_onnx,
    trace,
)
from .ort_integer import DynamicSpatialShapeError, OrtIntegerError, integerize
from .qdq import FORMS, LowerReport, collapsed_act_scales, lower, params_from_model, static_scale

__all__ = [
    "export_onnx", "trace", "lower_marked", "save_onnx", "check_onnx", "file_size", "model_info",
    "example_inputs_for", "ExportResult", "ExportError", "MarkedGraph", "LowerReport", "lower",
    "params_from_model", "static_scale", "collapsed_act_scales", "FORMS", "TARGETS", "DEFAULT_OPSET",
    "INPUT_SAMPLE", "INPUT_TIMESTEP", "INPUT_CONTEXT", "OUTPUT", "integerize", "OrtIntegerError",
    "DynamicSpatialShapeError",
]
