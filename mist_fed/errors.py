"""The one exception hierarchy of mist-fed; every message tells the user what to do next."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class MistError(Exception):
    """Base class of every error mist-fed raises on purpose."""


class ConfigError(MistError, ValueError):
    """A configuration value, flag or file is invalid."""


class BackboneError(MistError):
    """A backbone cannot be created or its weights cannot be loaded."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be fetched (offline hub, missing file)."""


class TaskError(MistError):
    """A task is unknown or its data is missing."""


class WireError(MistError):
    """Features on the wire do not match the expected schema or request."""


class ResourceLimitError(MistError):
    """A job does not fit the device profile's resources."""


class CloudUnavailableError(WireError):
    """The cloud feature service cannot be reached (after retries)."""


class CloudRequestError(WireError):
    """The cloud refused a request (bad ticket, unknown task, k out of range, limits)."""


class CloudAuthError(CloudRequestError):
    """The cloud refused the token (missing, wrong, or not scoped to the task)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after cleaning up; says what it kept (``run_dir``, if any).

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C still does; the CLI exits with 130.
    """

    def __init__(self, message: str, run_dir: Path | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


def one_of(key: str, value: T, choices: Collection[T], error: type[MistError] = ConfigError) -> T:
    """``value`` for ``key`` if it is one of ``choices``; else ``error`` naming them."""
    if value not in choices:
        raise error(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def only_known(what: str, args: Collection[str], allowed: Collection[str]) -> None:
    """Refuse argument names ``what`` does not take, in one line that lists those it does."""
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no arguments"
        raise ConfigError(f"{what} has no argument(s) {', '.join(unknown)}; it takes {takes}")
