"""The one exception hierarchy of mist-fed; every message tells the user what to do next."""

from __future__ import annotations

from pathlib import Path


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
