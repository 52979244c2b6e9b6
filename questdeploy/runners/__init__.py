"""Runners: one interface (activate / infer / deactivate, ``eps`` for sampling) over PyTorch,
onnxruntime and ``onnx.reference``; used by verify and eval. A TensorRT runner belongs here too
(lazy ``tensorrt`` import) once a GPU stage needs it."""

from .base import CONTEXT, OUTPUT, SAMPLE, TIMESTEP, Runner, make_feed
from .onnxrt import OnnxRuntimeRunner, session_options
from .reference import ReferenceRunner
from .torch_runner import TorchRunner

__all__ = [
    "Runner", "TorchRunner", "OnnxRuntimeRunner", "ReferenceRunner", "session_options", "make_feed",
    "SAMPLE", "TIMESTEP", "CONTEXT", "OUTPUT",
]
