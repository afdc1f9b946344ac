"""Ray for a fleet run: a local Ray of the run's own or a named cluster, what its workers get,
and the Ray resources of one device.

:func:`ray_runtime` starts (or joins) Ray for :func:`mist_fed.fleet.flower.simulation.simulate`. Code reaches
the workers through Ray's ``runtime_env``, the same way on a local Ray and on a cluster:
:func:`code_package` stages the ``mist_fed`` package the driver runs plus the device profiles
(``edge_profiles``) as the job's ``working_dir``; Ray uploads it to the cluster and unpacks it on
every node, and workers import ``mist_fed`` from there, not from what the node has installed
(its dependencies, torch and Flower among them, must be installed on every node). The only
variables the job adds are :func:`worker_env`'s, which name no path of the driver's machine:
a worker on another machine uses its own cache directory (its ``MIST_FED_CACHE``, else
``~/.cache/mist-fed``). A local Ray's workers are children of the driver's own Ray processes
and, as with any Ray, inherit the driver's environment; a cluster's inherit ``ray start``'s.

:func:`client_resources` is the Ray resource shape of one virtual device; :func:`fit_cluster`
shrinks it until every node of the cluster hosts at least one device, and
:func:`advertised_host` / :func:`check_cloud_reachable` keep the cloud's address one that
every node can dial. :func:`clean_nodes` removes a run's device storage on every node, each
under its own root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mist_fed.assets.defaults import WILDCARD_HOSTS
from mist_fed.device.profiles import load_profile, profile_resources, profiles_dir
from mist_fed.errors import ConfigError, ResourceLimitError
from mist_fed.fleet.storage import remove_run

if TYPE_CHECKING:  # devices import running_ray from here: no spec, backbone or timm for them
    from mist_fed.fleet.spec import FleetSpec

log = logging.getLogger(__name__)

# Variables a worker gets from the driver: switches, never paths.
SHIPPED_ENV = ("HF_HUB_OFFLINE", "MIST_FED_OFFLINE", "MIST_FED_FAULTS")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
CLEAN_S = 30.0  # bound on waiting for the nodes to remove a run's device storage


def running_ray() -> ModuleType | None:
    """The ``ray`` module when this process already runs Ray, else ``None``; never imports it.

    Under ``flwr run .`` Flower's main thread imports and starts Ray while the ServerApp's
    thread runs: until that import ends, ``ray`` is a partially initialised module
    (``AttributeError`` on its functions), which counts as not running.
    """
    ray = sys.modules.get("ray")
    try:
        return ray if ray is not None and ray.is_initialized() else None
    except AttributeError:
        return None


def host_node() -> str:
    """Where this process runs: its Ray node's id inside Ray, else the host's name."""
    ray = running_ray()
    if ray is not None:
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


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


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the Ray cluster this process is connected to."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


def fit_cluster(
    res: dict[str, float], nodes: Sequence[dict[str, float]] | None = None
) -> dict[str, float]:
    """Shrink one device's Ray ask until every node with CPUs hosts at least one device.

    The CPU ask is clipped to the smallest node's CPUs, the memory ask to one actor slot of the
    tightest node (Flower sizes its actor pool node by node; an actor that fits no node would
    wait forever). Each device still runs with its own profile's threads and memory cap, checked
    inside :func:`~mist_fed.fleet.worker.run_device`: only Ray's bookkeeping shrinks.
    """
    usable = [n for n in (node_resources() if nodes is None else nodes) if n.get("CPU", 0) > 0]
    if not usable:
        raise ResourceLimitError(
            "the Ray cluster has no node with CPUs to host devices; add one with "
            "`ray start --address HEAD:PORT --num-cpus N`"
        )
    smallest = min(n["CPU"] for n in usable)
    if res["num_cpus"] > smallest:
        log.info(
            "a device asks %g CPUs but the smallest Ray node has %g: Ray reserves %g per "
            "device (its torch threads still follow its profile)",
            res["num_cpus"],
            smallest,
            smallest,
        )
        res = {**res, "num_cpus": smallest}
    per_slot = min(
        float(n.get("memory", res["memory"])) / max(1, int(n["CPU"] // res["num_cpus"]))
        for n in usable
    )
    if res["memory"] > per_slot:
        log.info(
            "profile memory %.0f MB per device exceeds the %.0f MB one actor of the tightest "
            "Ray node gets; Ray reserves the latter, the device cap is still checked per device",
            res["memory"] / 2**20,
            per_slot / 2**20,
        )
        res = {**res, "memory": per_slot}
    return res


def worker_env() -> dict[str, str]:
    """The variables a fleet's Ray job sets in its workers: switches only, no driver path."""
    env = {"FLWR_TELEMETRY_ENABLED": "0"}
    for key in SHIPPED_ENV:
        if key in os.environ:
            env[key] = os.environ[key]
    return env


@contextlib.contextmanager
def code_package() -> Iterator[Path]:
    """A temporary folder of what workers import: this ``mist_fed`` package and its profiles.

    ``<tmp>/mist_fed`` (no ``__pycache__``) and ``<tmp>/edge_profiles`` (the ``*.toml`` of
    :func:`~mist_fed.device.profiles.profiles_dir`, where a worker's ``profiles_dir`` looks
    first). Ray zips and uploads it in ``ray.init``; the folder is removed after.
    """
    import mist_fed

    src = Path(mist_fed.__file__).resolve().parent
    profiles = profiles_dir()
    with tempfile.TemporaryDirectory(prefix="mist-fed-code-") as tmp:
        root = Path(tmp)
        shutil.copytree(src, root / "mist_fed", ignore=_SKIP)
        (root / "edge_profiles").mkdir()
        for p in sorted(profiles.glob("*.toml")):
            shutil.copyfile(p, root / "edge_profiles" / p.name)
        yield root


def runtime_env(code: Path) -> dict[str, Any]:
    """The job's ``runtime_env``: ``code`` (see :func:`code_package`) and :func:`worker_env`."""
    return {"working_dir": str(code), "env_vars": worker_env()}


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def advertised_host(bind: str) -> str:
    """The host devices dial for a cloud bound on ``bind``.

    ``bind`` itself, except for a wildcard (``0.0.0.0``, ``::``): then this machine's IP as Ray
    names its nodes (the address ``ray start`` would register this machine with).
    """
    if not is_wildcard(bind):
        return bind
    import ray.util

    return str(ray.util.get_node_ip_address())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_cloud_reachable(cloud: str) -> None:
    """Fail in one line when Ray nodes on other machines could not dial ``cloud``.

    A loopback address (``127.0.0.1``, ``localhost``) reaches only this machine's nodes.
    """
    host = urlparse(cloud).hostname or ""
    if not _is_loopback(host):
        return
    import ray
    import ray.util

    here = ray.util.get_node_ip_address()
    others = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")} - {here})
    if others:
        raise ConfigError(
            f"the cloud at {cloud} is on loopback, which Ray nodes on other machines "
            f"({', '.join(others)}) cannot reach: pass --cloud-bind 0.0.0.0 (devices then dial "
            f"{here}, or --cloud-advertise HOST), or --cloud grpc://HOST:PORT for a running cloud"
        )


def clean_nodes(run: str, timeout_s: float = CLEAN_S) -> None:
    """Remove the run's device storage on every live node of the connected Ray cluster.

    One task per node (no CPUs, pinned to it with ``NodeAffinitySchedulingStrategy``) runs
    :func:`~mist_fed.fleet.storage.remove_run` under that node's own root. A node whose task
    fails, or does not end within ``timeout_s``, is logged and left as it is.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remove = ray.remote(num_cpus=0, max_retries=0)(remove_run)
    node_of = {
        remove.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(run): n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive")
    }
    done, late = ray.wait(list(node_of), num_returns=len(node_of), timeout=timeout_s)
    removed = 0
    for ref in done:
        try:
            ray.get(ref)
            removed += 1
        except Exception as e:  # that node keeps its copy; the run itself is over
            log.warning("node %s could not remove device storage %s: %s", node_of[ref], run, e)
    for ref in late:
        log.warning(
            "node %s did not remove device storage %s in %.0f s", node_of[ref], run, timeout_s
        )
    log.info("device storage %s removed on %d of %d nodes", run, removed, len(node_of))


def _connect(kw: dict[str, Any]) -> None:
    """``ray.init(**kw)`` with the job's code and variables (:func:`runtime_env`)."""
    import ray

    with code_package() as code:
        ray.init(runtime_env=runtime_env(code), **kw)  # uploads the code; the folder may go


@contextlib.contextmanager
def ray_runtime(
    address: str | None,
    num_cpus: int | None,
    verbose: int,
    cloud: str | None = None,
    run: str | None = None,
) -> Iterator[None]:
    """Ray for the run: ``address`` (or ``RAY_ADDRESS``) names a cluster, else a local Ray.

    ``cloud``: the location devices will dial; a loopback one fails on a multi-machine cluster.
    ``run``: the run's device storage, removed after from every node of a cluster
    (:func:`clean_nodes`; Flower's runtime shuts Ray down as its run ends, so this connects
    again). A local Ray's workers share this machine and the driver's environment: its
    storage is the driver's own.
    """
    import ray

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only; quiets a warning
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose > 0,
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
    _connect(kw)
    try:
        if cloud is not None:
            check_cloud_reachable(cloud)
        yield
    finally:
        if run is not None and address:
            try:
                if not ray.is_initialized():
                    _connect(kw)
                clean_nodes(run)
            except Exception as e:  # the cluster is gone: nothing there to clean either
                log.warning("could not remove device storage %s on the cluster: %s", run, e)
        if ray.is_initialized():
            ray.shutdown()
