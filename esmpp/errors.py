"""One error family for everything a user can get wrong.

Every message names the file or input, what was expected, and how to fix it. The CLI turns an
``EsmppError`` into a one-line message and a non-zero exit code; any other exception is a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is imported by what validates, not by every command that may raise
    from collections.abc import Mapping

    from pydantic import ValidationError
    from pydantic_core import ErrorDetails


class EsmppError(Exception):
    """Base class: a problem with the user's input, files or options (not a bug in esmpp)."""


class CheckpointError(EsmppError):
    """A checkpoint file cannot be read, or does not match the expected architecture."""


class ArchitectureError(EsmppError):
    """An architecture name or config is unknown or inconsistent."""


class ArtifactError(EsmppError):
    """An ESM++ artifact directory is missing, corrupted, or from an incompatible format version."""


class ImageError(EsmppError):
    """An input image cannot be decoded or has an unusable size, mode or dtype."""


class ConfigError(EsmppError):
    """A build config or an option value is invalid."""


class DatasetError(EsmppError):
    """A zoo dataset cannot be loaded (usually: its package is not installed)."""


class StorageError(EsmppError):
    """Working files cannot be written where esmpp puts them (a full disk, no permission)."""


def validation_problems(error: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """pydantic's findings as one line: ``where: what`` for each, ``where`` the dotted field path (e.g.
    ``options.rank: Input should be greater than or equal to 1``). With ``flags`` (top-level field → the
    command-line flag that sets it), for values a caller gave: each names the flag too, and the value refused
    (``task_counts.1 (--tasks): Input should be greater than or equal to 1 (got 0)``)."""

    def line(problem: ErrorDetails) -> str:
        loc, what = problem["loc"], plain(problem["msg"])
        if not loc:
            return what
        where = ".".join(map(str, loc))
        if flags is None:
            return f"{where}: {what}"
        flag = flags.get(str(loc[0]))
        return f"{where}{f' ({flag})' if flag else ''}: {what} (got {problem['input']!r})"

    return "; ".join(line(problem) for problem in error.errors(include_url=False))


def plain(message: str) -> str:
    """pydantic's ``message`` without the "Value error, " it puts before what a validator of ours said."""
    return message.replace("Value error, ", "", 1)
