"""The one exception hierarchy of mist-fed; every message tells the user what to do next."""


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
