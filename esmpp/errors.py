"""One error family for everything a user can get wrong.

Every message names the file or input, what was expected, and how to fix it. The CLI turns an
``EsmppError`` into a one-line message and a non-zero exit code; any other exception is a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is imported by what validates, not by every command that may raise
    from pydantic import ValidationError


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


def validation_problems(error: ValidationError) -> str:
    """pydantic's findings as one line: ``where: what`` for each, ``where`` the dotted field path (e.g.
    ``options.rank: Input should be greater than or equal to 1``)."""
    return "; ".join(
        f"{'.'.join(map(str, problem['loc']))}: {plain(problem['msg'])}" if problem["loc"] else plain(problem["msg"])
        for problem in error.errors(include_url=False)
    )


def plain(message: str) -> str:
    """pydantic's ``message`` without the "Value error, " it puts before what a validator of ours said."""
    return message.replace("Value error, ", "", 1)
