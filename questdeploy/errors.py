"""Typed errors raised by the library.

Only the CLI turns them into one-line messages and exit codes. A user error carries a
``hint`` saying what to do next; bugs are ordinary exceptions and keep their traceback.
"""

from __future__ import annotations


class QuestDeployError(Exception):
    """Base of every error a user can cause and fix."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class ModelLoadError(QuestDeployError):
    """The --model path is missing, not a diffusers folder, or a hub id."""


class RunFolderError(QuestDeployError):
    """The run folder is inconsistent, locked, or belongs to another model."""


class StageNotReadyError(QuestDeployError):
    """A stage's inputs are missing: an earlier stage has not run."""


class NotImplementedStageError(QuestDeployError):
    """A stage exists in the graph but is not built yet; said plainly, never faked."""

    exit_code = 3


class ConfigError(QuestDeployError):
    """An option or config value is out of range."""


class DataError(QuestDeployError):
    """Calibration or checkpoint data is corrupt (NaN/Inf, wrong shapes, truncated)."""


class VerificationError(QuestDeployError):
    """A numerical tolerance was exceeded."""

    exit_code = 4
