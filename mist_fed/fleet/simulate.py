"""Run a fleet simulation: cloud feature service, Ray, Flower's Simulation Runtime, results.

:func:`simulate` is what ``simulations/run.py`` and ``mist-fed simulate`` call. Without a cloud
address it starts the cloud feature service on 127.0.0.1 for the run and stops it after;
without a Ray address it starts a local Ray with a bounded CPU count and shuts it down.
Ctrl-C ends the whole run: the devices' jobs are killed, Ray and the cloud stop, the rounds
completed so far are written, and :class:`~mist_fed.errors.Interrupted` says where.
:func:`run_plain` runs the same rounds in this process, one device after another (the
baseline of the overhead benchmark). Every run's devices start empty: their storage
(:func:`device_storage`) lives as long as the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.defaults import cache_dir
from mist_fed.device.profiles import load_profile, profile_resources
from mist_fed.errors import BackboneError, Interrupted, MistError, TaskError
from mist_fed.fleet.device import DeviceResult
from mist_fed.fleet.runner import (
    FleetRunner,
    RunRecords,
    local_train_fn,
    plan_devices,
)
from mist_fed.fleet.spec import FleetSpec, spec_to_dict
from mist_fed.model.backbone import Backbone, BackboneSpec, create_backbone
from mist_fed.wire.client import FeatureClient

log = logging.getLogger(__name__)

CLOUD_FACTS = ("images_embedded", "cache_hits", "cache_misses", "bytes_served", "rows_served")
StatsFn = Callable[[], dict[str, Any]]
SERVER_STOP_S = 10.0  # bound on waiting for the ServerApp thread after the runtime ends


@dataclass
class SimulationResult:
    run_dir: Path | None
    wall_s: float
    records: RunRecords
    cloud_stats: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


# -- assets and services ------------------------------------------------------------------------

_BACKBONES: dict[str, Backbone] = {}


def load_backbone(cfg: BackboneSpec) -> Backbone:
    """The embedded cloud's backbone (built once per process; devices never build one)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _BACKBONES:
        _BACKBONES[key] = create_backbone(
            cfg.name,
            weights=cfg.weights,
            random_init=cfg.random_init,
            seed=cfg.seed,
            **cfg.model_kwargs,
        )
    return _BACKBONES[key]


@contextlib.contextmanager
def device_storage(root: str | Path | None = None) -> Iterator[Path]:
    """A fresh directory for the run's devices' storage (their feature caches), removed after.

    Under ``root`` (default ``$MIST_FED_CACHE/devices``): simulated devices start empty and
    keep their files for every round of the run, not beyond it.
    """
    base = Path(root) if root is not None else cache_dir() / "devices"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def resolve_assets(spec: FleetSpec) -> FleetSpec:
    """The spec itself when its tasks and backbone load here, else its synthetic fallback."""
    from mist_fed.data import get_task

    try:
        for f in spec.fleets:
            get_task(f.task)
        load_backbone(spec.backbone)
        return spec
    except (TaskError, BackboneError) as e:
        if spec.fallback_task is None or spec.fallback_backbone is None:
            raise
        log.warning("real assets unavailable (%s); running the synthetic fallback fleet", e)
        fleets = tuple(
            dataclasses.replace(f, task=spec.fallback_task, name="") for f in spec.fleets
        )
        names = [f.name for f in fleets]
        if len(set(names)) != len(names):  # several real tasks collapse onto one synthetic
            fleets = tuple(
                dataclasses.replace(f, name=f"{f.name}#{i}") for i, f in enumerate(fleets)
            )
        return dataclasses.replace(
            spec,
            fleets=fleets,
            backbone=spec.fallback_backbone,
            fallback_task=None,
            fallback_backbone=None,
        )


def serve_config(spec: FleetSpec) -> ServeConfig:
    """The embedded cloud's config: the spec's backbone, a free port on 127.0.0.1."""
    b = spec.backbone
    return ServeConfig(
        port=0,
        backbone=b.name,
        weights=b.weights,
        random_init=b.random_init,
        seed=b.seed,
        model_kwargs=dict(b.model_kwargs),
        tasks=tuple(dict.fromkeys(f.task for f in spec.fleets)),
        default_dtype=spec.wire_dtype,
    )


def cloud_stats(location: str) -> dict[str, Any]:
    """The service's counters (images embedded, cache hits, bytes served)."""
    try:
        with FeatureClient(location, retries=1) as c:
            return c.stats()
    except MistError as e:
        log.warning("could not read the cloud's counters: %s", e)
        return {}


@contextlib.contextmanager
def cloud_service(spec: FleetSpec, address: str | None) -> Iterator[tuple[str, StatsFn]]:
    """Yield ``(location, stats)``: ``address`` when given, else an embedded cloud for the run."""
    if address:
        yield address, lambda: cloud_stats(address)
        return
    with running_cloud(serve_config(spec), backbone=load_backbone(spec.backbone)) as location:
        log.info("embedded cloud feature service at %s", location)
        yield location, lambda: cloud_stats(location)


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


def _fit_memory(res: dict[str, float]) -> dict[str, float]:
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


@contextlib.contextmanager
def stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C sets ``stop`` at once, then interrupts as before (``KeyboardInterrupt``).

    Flower's runtime starts tearing down (killing busy devices) when the interrupt reaches it;
    with ``stop`` already set, a round whose devices were killed by that teardown is not taken
    for a completed one. Outside the main thread it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        stop.set()
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- runs ---------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over device-rounds (off when ``enabled`` is false).

    :meth:`tick` advances it as each reply arrives; calling it with a round's results
    (after stragglers and dropouts are decided) updates the status counts.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="dev-round", dynamic_ncols=True, leave=False)
        self.counts: dict[str, int] = {}
        self.ticked = 0
        self.done = 0

    def tick(self) -> None:
        self.ticked += 1
        if self.bar is not None and self.ticked > self.done:
            self.bar.update(1)

    def __call__(self, res: DeviceResult) -> None:
        self.counts[res.status] = self.counts.get(res.status, 0) + 1
        self.done += 1
        if self.bar is not None:
            if self.done > self.ticked:
                self.bar.update(1)
                self.ticked = self.done
            self.bar.set_postfix(self.counts, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def simulate(
    spec: FleetSpec,
    results_dir: str | Path | None = "results",
    *,
    run_id: str | None = None,
    cloud: str | None = None,
    ray_address: str | None = None,
    ray_cpus: int | None = None,
    progress: bool = True,
    verbose: int = 0,
) -> SimulationResult:
    """Run ``spec`` on Flower's Ray backend and write ``results_dir/<run-id>/``.

    ``verbose``: 0 keeps Flower and Ray quiet, 1 lets Ray workers log, 2 adds Flower's debug log.
    On Ctrl-C it cleans up, writes the completed rounds (``config.toml`` records
    ``interrupted`` and ``rounds_completed``) and raises :class:`~mist_fed.errors.Interrupted`.
    """
    from flwr.simulation import run_simulation

    from mist_fed.fleet import ray_pool
    from mist_fed.fleet.client_app import app as client_app
    from mist_fed.fleet.server_app import make_server_app

    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)
    spec = resolve_assets(spec)
    t0 = time.perf_counter()
    bar = Progress(spec.rounds * spec.num_devices, progress)
    sink: dict[str, Any] = {}
    stop = threading.Event()
    interrupted = False
    facts = {"engine": "flower+ray", "cloud": cloud or "embedded", "ray_address": ray_address}
    try:
        with device_storage() as storage, cloud_service(spec, cloud) as (location, stats):
            try:
                with ray_runtime(ray_address, ray_cpus, verbose):
                    res = _fit_memory(client_resources(spec))
                    log.info("Ray client resources per device: %s", res)
                    ray_pool.install()
                    backend_config: dict[str, Any] = {"client_resources": res, "init_args": {}}
                    with stop_on_sigint(stop):
                        run_simulation(
                            server_app=make_server_app(spec, location, storage, sink, bar, stop),
                            client_app=client_app,
                            num_supernodes=spec.num_devices,
                            backend_config=backend_config,
                            verbose_logging=verbose > 1,
                        )
            except KeyboardInterrupt:
                interrupted = True
                log.warning("interrupted: stopping the fleet, Ray and the cloud")
            finally:
                # However the runtime ended, the ServerApp's thread must not outlive it.
                stop.set()
                if "done" in sink and not sink["done"].wait(SERVER_STOP_S):
                    log.warning("the ServerApp thread did not stop in %.0f s", SERVER_STOP_S)
            cloud_stats = stats()
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if interrupted:
        raise _interrupted(spec, sink.get("partial"), results_dir, wall, cloud_stats, run_id, facts)
    if "records" not in sink:
        raise MistError("the Flower simulation ended without results; rerun with -v to see its log")
    records: RunRecords = sink["records"]
    run_dir = finish_run(spec, records, results_dir, wall, cloud_stats, run_id, facts)
    return SimulationResult(run_dir, wall, records, cloud_stats, facts)


def _interrupted(
    spec: FleetSpec,
    partial: RunRecords | None,
    results_dir: str | Path | None,
    wall_s: float,
    cloud_stats: dict[str, Any],
    run_id: str | None,
    facts: dict[str, Any],
) -> Interrupted:
    """Write the rounds a stopped run completed (if any); the exception that tells of them."""
    done = max((r["round"] for r in partial.fleets), default=0) if partial else 0
    if partial is None or done == 0:
        return Interrupted(f"stopped before any of {spec.rounds} rounds completed; nothing written")
    facts = {**facts, "interrupted": True, "rounds_completed": done}
    run_dir = finish_run(spec, partial, results_dir, wall_s, cloud_stats, run_id, facts)
    where = f"; partial results in {run_dir}" if run_dir is not None else ""
    return Interrupted(f"stopped after {done} of {spec.rounds} rounds{where}", run_dir)


def run_plain(
    spec: FleetSpec,
    location: str,
    progress: Callable[[DeviceResult], None] | None = None,
) -> RunRecords:
    """The same rounds with no Flower and no Ray: every device in this process, in turn."""
    with device_storage() as storage:
        runner = FleetRunner(spec, plan_devices(spec), location, storage)
        return runner.run(local_train_fn, on_result=progress)


def finish_run(
    spec: FleetSpec,
    records: RunRecords,
    results_dir: str | Path | None,
    wall_s: float,
    cloud_stats: dict[str, Any],
    run_id: str | None = None,
    facts: dict[str, Any] | None = None,
) -> Path | None:
    """Write the run's files and plots; ``results_dir=None`` writes nothing."""
    if results_dir is None:
        return None
    from mist_fed.report.plots import plot_run
    from mist_fed.report.results import device_frame, fleet_frame, new_run_id, write_run

    run_dir = Path(results_dir) / (run_id or new_run_id())
    all_facts = {
        **(facts or {}),
        "wall_s": round(wall_s, 2),
        "devices": spec.num_devices,
        "rounds": spec.rounds,
        **{f"cloud_{k}": v for k, v in cloud_stats.items() if k in CLOUD_FACTS},
    }
    write_run(run_dir, spec_to_dict(spec), records.devices, records.fleets, all_facts)
    plot_run(run_dir, device_frame(records.devices), fleet_frame(records.fleets))
    log.info("results in %s", run_dir)
    return run_dir
