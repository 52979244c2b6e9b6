"""Typed errors of the quantization package.

Every user-facing error carries a ``hint``: one line that says what to do next. The classes also
derive from the builtin exception a caller would naturally catch (``ValueError`` for bad input,
``RuntimeError`` for a model in the wrong state), so code that does not know questdeploy still works.
``QuantError`` derives from the project-wide ``QuestDeployError``, so the CLI prints it as one line.
"""

from __future__ import annotations

from ..errors import QuestDeployError


class QuantError(QuestDeployError):
    """Base of all quantization errors: a message plus an optional fix-it ``hint`` (see questdeploy.errors)."""

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nHint: {self.hint}"
        return self.message


class QuantConfigError(QuantError, ValueError):
    """A quantization config, granularity or quantizer argument is invalid."""


class UnsupportedBitsError(QuantConfigError):
    """A bit width outside what questdeploy can deploy (weights / activations: 4 or 8)."""


class ScaleShapeError(QuantError, ValueError):
    """A scale (or zero point) does not fit the tensor it quantizes for the given axis / block size."""


class TimestepError(QuantError, ValueError):
    """A timestep cannot be mapped to one timestep group (e.g. a batch with different timesteps)."""


class CalibrationError(QuantError, RuntimeError):
    """Calibration could not produce scales (e.g. no data was observed)."""


class SpecError(QuantError, ValueError):
    """A quantization spec (quant_spec.json) is malformed or from an unsupported version."""


class SpecMismatchError(SpecError):
    """A quantization spec does not describe the model it is applied to."""
