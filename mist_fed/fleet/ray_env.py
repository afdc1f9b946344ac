"""Ray for a fleet run: a local Ray of the run's own or a named cluster, and device resources.

:func:`ray_runtime` starts (or joins) Ray for :func:`mist_fed.fleet.run.simulate`;
:func:`client_resources` is the Ray resource shape of one virtual device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mist_fed.device.profiles import load_profile, profile_resources
from mist_fed.fleet.spec import FleetSpec

log = logging.getLogger(__name__)


def client_resources(spec: FleetSpec) -> dict[str, float]:
    """Ray resources of one virtual device: the largest any profile of the mix asks for.

    Flower runs every ClientApp in one actor pool with one resource shape; per-device threads
    and memory caps still follow each device's own profile inside :func:`run_device`.
    """
    plans = [profile_resources(load_profile(name)) for name, _ in spec.profiles]
    return {
        "num_cpus": max(p.ray_num_cpus for p in plans),
        "num_gpus": 0.0,
        "memory": float(max(p.ray_memory_bytes for p in plans)),
    }


def fit_memory(res: dict[str, float]) -> dict[str, float]:
    """Clip the memory request to what one actor slot of this Ray cluster can get."""
    import ray

    total = ray.cluster_resources()
    slots = max(1, int(total.get("CPU", 1) // max(res["num_cpus"], 1e-9)))
    per_slot = float(total.get("memory", res["memory"])) / slots
    if res["memory"] > per_slot:
        log.info(
            "profile memory %.0f MB per device exceeds this host's %.0f MB per actor; "
            "Ray reserves the latter, the device cap is still checked per device",
            res["memory"] / 2**20,
            per_slot / 2**20,
        )
        res = {**res, "memory": per_slot}
    return res


def worker_env() -> dict[str, str]:
    # This checkout's package first, so workers import the same mist_fed as the driver.
    here = str(Path(__file__).resolve().parents[2])
    paths = [here, *(os.path.abspath(p or ".") for p in sys.path)]
    env = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
    }
    for key in ("MIST_FED_CACHE", "HF_HUB_OFFLINE", "MIST_FED_FAULTS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


@contextlib.contextmanager
def ray_runtime(address: str | None, num_cpus: int | None, verbose: int) -> Iterator[None]:
    import ray

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only; quiets a warning
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose > 0,
        "runtime_env": {"env_vars": worker_env()},
    }
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        kw["address"] = address
    else:
        # "local": always a fresh Ray of our own, whatever a stopped `ray start --head` left
        # behind (its current-cluster file made ray.init try to join a dead cluster).
        kw["address"] = "local"
        kw["num_cpus"] = num_cpus or min(os.cpu_count() or 1, 4)
        # Ray starts workers at niceness 15; on a busy host that starves the devices against
        # the driver (and the embedded cloud), so local workers run at the driver's priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(**kw)
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
