"""One exception hierarchy. The CLI turns each into one ``Error: ...`` line and its exit code."""

from __future__ import annotations

import re

#: Exit codes, documented in the README.
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3
EXIT_TRT_UNAVAILABLE = 4


class ResnetExportError(Exception):
    """A problem the user can fix; the message is one line and says what to do."""

    exit_code = EXIT_USER_ERROR


class ModelError(ResnetExportError):
    """The model source (arch, factory, checkpoint, forward pass) is unusable."""


class CheckpointError(ModelError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model."""


class OutputError(ResnetExportError):
    """An output path cannot be written."""


class OnnxError(ResnetExportError):
    """An ONNX file is missing, invalid, or its export failed."""


class UnverifiedArtifact(ResnetExportError):
    """An artifact whose manifest says it failed its gate, asked to be served (refused unless allowed)."""

    exit_code = EXIT_USAGE


class GateFailed(ResnetExportError):
    """An artifact was produced but missed a verification gate (the artifact is kept)."""

    exit_code = EXIT_GATE_FAILED


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (ANSI colours removed), or its type name."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` chain."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc
