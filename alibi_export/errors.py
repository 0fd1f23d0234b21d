"""One small hierarchy of errors: the CLI turns each into a one-line message and exit code 1.

Messages read "what failed" followed by "Note: expected X, got Y" where that helps the user.
"""
from __future__ import annotations

__all__ = [
    "AlibiExportError", "ConfigError", "CheckpointError", "ExportError", "ParityError",
    "DataError", "MissingDependencyError", "EngineBuildError",
]


class AlibiExportError(Exception):
    """Base of every error a user can cause or fix."""


class ConfigError(AlibiExportError, ValueError):
    pass


class CheckpointError(AlibiExportError):
    pass


class ExportError(AlibiExportError):
    pass


class ParityError(AlibiExportError):
    pass


class DataError(AlibiExportError, ValueError):
    pass


class EngineBuildError(AlibiExportError):
    pass


class MissingDependencyError(AlibiExportError, ImportError):
    """An optional package is absent; the message names the pip command that installs it."""

    def __init__(self, package: str, extra: str, why: str):
        super().__init__(f"{why} needs the optional package {package!r}. Note: install it with "
                         f"`pip install 'alibi-export[{extra}]'`")
