"""Where a fleet run's devices keep their files, on whichever machine they run.

A :class:`~mist_fed.fleet.job.DeviceJob` names its device's directory relative to a
device-storage root (``run-XXXX/<fleet>/<device>``, :meth:`RunStorage.location`), never as a
path of the driver's machine; the process that runs the job resolves it under its own root
(:func:`resolve`: :func:`devices_root`, ``$MIST_FED_CACHE/devices`` of that process), so each
node writes only under its own cache directory. :func:`device_storage` makes the run's
directory on the driver, where the in-process devices and the server's reference
(``_server/``) resolve theirs, and removes it after; on a Ray cluster each node's copy goes
with :func:`remove_run` in a task on that node (:func:`mist_fed.fleet.runtime.cluster.clean_nodes`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mist_fed.assets.defaults import cache_dir
from mist_fed.errors import ConfigError


def devices_root() -> Path:
    """This process's root of device storage: ``$MIST_FED_CACHE/devices`` (or the default
    cache directory's), read when called, so a worker uses its own node's."""
    return cache_dir() / "devices"


def _relative(location: str) -> PurePosixPath:
    path = PurePosixPath(location)
    if not location or path.is_absolute() or ".." in path.parts:
        raise ConfigError(
            f"a device job's storage must be a path relative to a node's device storage "
            f"(run-*/<fleet>/<device>, no '..'), not {location!r}"
        )
    return path


def resolve(location: str, root: str | Path | None = None) -> Path:
    """Where ``location`` (a job's storage) lies here: under ``root``, default
    :func:`devices_root`. An empty or absolute location, or one with ``..``, is a
    :class:`~mist_fed.errors.ConfigError`."""
    return (devices_root() if root is None else Path(root)) / _relative(location)


def run_name(location: str) -> str:
    """The run a device's ``location`` belongs to (its first part: ``run-XXXX``)."""
    return _relative(location).parts[0]


def remove_run(run: str, root: str | Path | None = None) -> None:
    """Remove the run's device storage here (``<root>/<run>``; nothing there: nothing to do)."""
    shutil.rmtree(resolve(run, root), ignore_errors=True)


@dataclass(frozen=True)
class RunStorage:
    """A run's device storage on the driver's machine: ``root / name``."""

    root: Path
    name: str  # run-XXXX: the first part of every device's location, on every node

    @property
    def path(self) -> Path:
        return self.root / self.name

    def location(self, fleet: str, device: int) -> str:
        """A device's storage, relative to any node's root: ``<run>/<fleet, safe>/<device>``."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", fleet).strip("._") or "fleet"
        return f"{self.name}/{safe}/{device}"


@contextlib.contextmanager
def device_storage() -> Iterator[RunStorage]:
    """A fresh run directory under :func:`devices_root`, removed after.

    Simulated devices start empty and keep their files for every round of the run, not
    beyond it. Devices in this process resolve their locations under the same root.
    """
    root = devices_root()
    root.mkdir(parents=True, exist_ok=True)
    run = RunStorage(root, Path(tempfile.mkdtemp(prefix="run-", dir=root)).name)
    try:
        yield run
    finally:
        remove_run(run.name, root)
