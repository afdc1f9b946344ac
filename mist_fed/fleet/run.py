"""The lifecycle of ``mist-fed simulate``: cloud feature service, Ray, Flower's runtime, results.

:func:`simulate` is what ``simulations/run.py`` and ``mist-fed simulate`` call. Without a cloud
address it starts the cloud feature service on 127.0.0.1 for the run and stops it after;
without a Ray address it starts a local Ray with a bounded CPU count and shuts it down.
Ctrl-C ends the whole run: the devices' jobs are killed, Ray and the cloud stop, the rounds
completed so far are written, and :class:`~mist_fed.errors.Interrupted` says where.
:func:`run_plain` runs the same rounds in this process, one device after another (the
baseline of the overhead benchmark). The rounds themselves are :func:`run_fleet`'s, the same
under ``flwr run .`` (where Flower's runtime owns the lifecycle instead).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mist_fed.defaults import DEFAULT_HOST
from mist_fed.errors import Interrupted, MistError
from mist_fed.fleet.device import DeviceResult
from mist_fed.fleet.lifecycle import cloud_service, finish_run, resolve_assets
from mist_fed.fleet.ray_env import client_resources, fit_cluster, ray_runtime
from mist_fed.fleet.runner import FleetRunner, RunRecords, local_train_fn, plan_devices
from mist_fed.fleet.server_app import FleetOutcome, RunStopped, make_server_app
from mist_fed.fleet.spec import FleetSpec
from mist_fed.fleet.storage import device_storage

log = logging.getLogger(__name__)

SERVER_STOP_S = 10.0  # bound on waiting for the ServerApp thread after the runtime ends
STOP_POLL_S = 0.2  # how soon a stopped run tells its busy device jobs


@dataclass
class SimulationResult:
    run_dir: Path | None
    wall_s: float
    records: RunRecords
    cloud_stats: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


# -- stopping ----------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C sets ``stop``; a second one interrupts (``KeyboardInterrupt``).

    ``stop`` ends the ServerApp (:class:`~mist_fed.fleet.server_app.RunStopped`) and, through
    :func:`jobs_end_with_run`, the devices' busy jobs; Flower's runtime then ends as after a
    completed run, once no thread waits on a job, before it shuts Ray down. An interrupt would
    cut that wait short and shut Ray down under busy jobs (see ``fleet/flower.py``); it stays
    the way out of a run that does not stop. Outside the main thread it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            log.warning("interrupted: stopping the fleet, Ray and the cloud (Ctrl-C again: now)")
            return
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def jobs_end_with_run(
    storage: Path, stop: threading.Event, done: threading.Event
) -> Iterator[None]:
    """Once the run stops (``stop``) or its ServerApp ends (``done``), busy device jobs end.

    ``storage``: the run's device storage on this machine (jobs on other nodes do not see it).

    Flower's runtime waits for every busy job before it returns; the jobs end themselves when
    asked (:func:`mist_fed.fleet.flower.request_stop`), so neither a Ctrl-C nor a ServerApp
    that ended early waits on a device still training (or hanging).
    """
    from mist_fed.fleet.flower import request_stop

    closed = threading.Event()

    def watch() -> None:
        while not (stop.wait(STOP_POLL_S) or done.is_set() or closed.is_set()):
            pass
        if not closed.is_set():
            # Flower logs each ended job as an error with its traceback: noise here, since
            # whatever ended the run is reported (or the run is complete).
            flwr_log = logging.getLogger("flwr")
            if flwr_log.level != logging.DEBUG:  # -vv shows everything
                flwr_log.setLevel(logging.CRITICAL)
            request_stop(storage)

    watcher = threading.Thread(target=watch, name="mist-fed-run-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        closed.set()
        watcher.join()


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
    cloud_bind: str = DEFAULT_HOST,
    cloud_advertise: str | None = None,
    progress: bool = True,
    verbose: int = 0,
) -> SimulationResult:
    """Run ``spec`` on Flower's Ray backend and write ``results_dir/<run-id>/``.

    ``cloud_bind`` / ``cloud_advertise``: where the embedded cloud listens and the host the
    devices dial (default: the bind host; for ``0.0.0.0`` this machine's Ray node IP); see
    :func:`~mist_fed.fleet.lifecycle.cloud_service`.
    ``verbose``: 0 keeps Flower and Ray quiet, 1 lets Ray workers log, 2 adds Flower's debug log.
    On Ctrl-C it cleans up, writes the completed rounds (``config.toml`` records
    ``interrupted`` and ``rounds_completed``) and raises :class:`~mist_fed.errors.Interrupted`.
    """
    from flwr.simulation import run_simulation

    from mist_fed.fleet.client_app import app as client_app
    from mist_fed.fleet.flower import actor_options, quiet_actor_retries

    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)
    spec = resolve_assets(spec)
    t0 = time.perf_counter()
    bar = Progress(spec.rounds * spec.num_devices, progress)
    outcome = FleetOutcome()
    stop = threading.Event()
    interrupted = False
    facts = {"engine": "flower+ray", "cloud": cloud or "embedded", "ray_address": ray_address}
    try:
        with (
            device_storage() as storage,
            cloud_service(spec, cloud, cloud_bind, cloud_advertise) as (location, stats),
        ):
            try:
                quiet_actor_retries()
                with ray_runtime(ray_address, ray_cpus, verbose, location, storage.name):
                    res = fit_cluster(client_resources(spec))
                    log.info("Ray client resources per device: %s", res)
                    # Ray restarts a device's dead worker (fleet/flower.py says why it must).
                    actor_res = {**res, **actor_options()}
                    backend_config: dict[str, Any] = {
                        "client_resources": actor_res,
                        "init_args": {},
                    }
                    app = make_server_app(spec, location, storage, outcome, bar, stop)
                    with stop_on_sigint(stop), jobs_end_with_run(storage.path, stop, outcome.done):
                        run_simulation(
                            server_app=app,
                            client_app=client_app,
                            num_supernodes=spec.num_devices,
                            backend_config=backend_config,
                            verbose_logging=verbose > 1,
                        )
            except (KeyboardInterrupt, RunStopped) as e:  # RunStopped: a Ctrl-C set ``stop``
                interrupted = True
                if isinstance(e, KeyboardInterrupt):
                    log.warning("interrupted: stopping the fleet, Ray and the cloud")
            finally:
                # However the runtime ended, the ServerApp's thread must not outlive it.
                stop.set()
                if outcome.started and not outcome.done.wait(SERVER_STOP_S):
                    log.warning("the ServerApp thread did not stop in %.0f s", SERVER_STOP_S)
            cloud_stats = stats()
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if interrupted:
        raise _interrupted(spec, outcome.records, results_dir, wall, cloud_stats, run_id, facts)
    if not outcome.completed:
        raise MistError("the Flower simulation ended without results; rerun with -v to see its log")
    run_dir = finish_run(spec, outcome.records, results_dir, wall, cloud_stats, run_id, facts)
    return SimulationResult(run_dir, wall, outcome.records, cloud_stats, facts)


def _interrupted(
    spec: FleetSpec,
    partial: RunRecords,
    results_dir: str | Path | None,
    wall_s: float,
    cloud_stats: dict[str, Any],
    run_id: str | None,
    facts: dict[str, Any],
) -> Interrupted:
    """Write the rounds a stopped run completed (if any); the exception that tells of them."""
    done = max((r["round"] for r in partial.fleets), default=0)
    if done == 0:
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
