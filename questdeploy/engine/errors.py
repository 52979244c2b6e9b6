"""Typed errors of the engine stage (all derive from ``QuestDeployError``: one line + hint in the CLI).

Exit codes: 2 = the user can fix the input (lint errors, wrong ONNX form, bad option, incompatible
engine); 3 = this machine lacks something (TensorRT, a CUDA device), so the same command works elsewhere.
"""

from __future__ import annotations

from ..errors import QuestDeployError


class EngineError(QuestDeployError):
    """Base of the engine stage's errors."""


class TensorRTNotInstalledError(EngineError):
    """``import tensorrt`` failed."""

    exit_code = 3


class NoCudaDeviceError(EngineError):
    """TensorRT is importable but no CUDA device is visible."""

    exit_code = 3


class WrongOnnxFormError(EngineError):
    """The ONNX is not in a form TensorRT can build (e.g. the ``ort`` form with Gather scales)."""


class LintFailedError(EngineError):
    """The TensorRT rule lint found errors; the build does not start."""

    def __init__(self, message: str, hint: str | None = None, report=None):
        super().__init__(message, hint)
        self.report = report


class ProfileError(EngineError):
    """A build profile (engines/*.toml) or a --batch/--dim value is invalid."""


class EngineBuildError(EngineError):
    """The ONNX parser or the TensorRT builder failed; the message carries their errors in full."""


class EngineIncompatibleError(EngineError):
    """An engine was built for another GPU or TensorRT version than the one at hand."""
