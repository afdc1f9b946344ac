"""The Flower ServerApp of a fleet run: send jobs to the devices' ClientApps, gather replies.

The round logic lives in :class:`mist_fed.fleet.runner.FleetRunner`; this module only moves
:class:`DeviceJob` s and weights through Flower's Grid and back. ``app`` is the component
``flwr run .`` loads (its run-config is converted into a :class:`FleetSpec` once, here);
:func:`make_server_app` builds the same app around a ready spec for :mod:`mist_fed.fleet.run`,
which owns that run's lifecycle and reads what the app produced from a :class:`FleetOutcome`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from mist_fed.defaults import cache_dir
from mist_fed.errors import ConfigError
from mist_fed.fleet.device import FAILED, DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.flower import on_runtime_exit
from mist_fed.fleet.lifecycle import cloud_service, finish_run, resolve_assets
from mist_fed.fleet.messages import job_message, unpack_train_reply
from mist_fed.fleet.ray_env import clean_nodes, client_resources, running_ray
from mist_fed.fleet.runner import FleetRunner, RunRecords, check_devices, plan_devices
from mist_fed.fleet.spec import FleetSpec, spec_from_run_config
from mist_fed.fleet.storage import RunStorage, device_storage

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger(__name__)

POLL_S = 0.05
EXIT_WAIT_S = 20.0  # bound on the fleet's own stop when Flower's runtime exits


@dataclass
class FleetOutcome:
    """What a ServerApp's fleet produced, for whoever owns the run's lifecycle.

    ``records`` receives each round's rows as the round completes (what is left of a run that
    stops early); ``completed`` is set once every round has; ``done`` is set when the app's
    thread ends, however it ends (``started`` says whether it began at all).
    """

    records: RunRecords = field(default_factory=RunRecords)
    completed: bool = False
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class RunStopped(Exception):
    """The run was stopped from outside (Ctrl-C, or the simulation runtime ended early)."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunStopped("the fleet run was stopped")


class GridTransport:
    """The train callable of :class:`FleetRunner`, through a Flower Grid.

    ``window``: at most this many jobs in flight (pushed, not yet answered); a reply makes
    room for the next. In a simulation the devices run a few at a time (one per Ray actor)
    whatever is pushed, and Flower's in-memory runtime scans every stored message for every
    node on each of its 0.1 s sweeps: with a whole 1,000-device round pushed at once that
    scan alone is a million checks a sweep. A window of a few jobs per actor keeps the
    actors busy and the scan short; ``None`` pushes the round at once (real SuperNodes, each
    pulling its own job). ``stop``, once set, ends a wait for replies with
    :class:`RunStopped`, so the ServerApp thread does not outlive a simulation runtime that
    was interrupted.
    """

    def __init__(
        self,
        grid: Grid,
        node_ids: Sequence[int],
        timeout_s: float | None = None,
        stop: threading.Event | None = None,
        window: int | None = None,
    ):
        self.grid = grid
        self.node_ids = list(node_ids)
        self.timeout_s = timeout_s
        self.stop = stop
        self.window = window
        self.on_reply: Callable[[], None] | None = None

    def _exchange(
        self, jobs: Sequence[DeviceJob], states: Sequence[StateDict]
    ) -> dict[int, tuple[DeviceResult, StateDict | None]]:
        """Each device's unpacked reply (a Message is dropped as soon as it is read)."""
        todo = deque(zip(jobs, states, strict=True))
        job_of: dict[str, DeviceJob] = {}  # message id -> job, while in flight
        weights: dict[int, ArrayRecord] = {}  # one serialized copy per distinct state

        def push(n: int) -> None:
            batch = [todo.popleft() for _ in range(min(n, len(todo)))]
            msgs = []
            for j, s in batch:
                arrays = weights.get(id(s))
                if arrays is None:
                    arrays = weights[id(s)] = ArrayRecord.from_torch_state_dict(s)
                msgs.append(job_message(j, arrays, self.node_ids[j.device]))
            ids = list(self.grid.push_messages(msgs))
            job_of.update(zip(ids, (j for j, _ in batch), strict=True))

        replies: dict[int, tuple[DeviceResult, StateDict | None]] = {}
        push(len(todo) if self.window is None else self.window)
        end = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while job_of and (end is None or time.monotonic() < end):
            _check(self.stop)
            got = 0
            for m in self.grid.pull_messages(list(job_of)):
                job = job_of.pop(m.metadata.reply_to_message_id)
                replies[job.device] = unpack_train_reply(m, job)
                got += 1
                if self.on_reply:
                    self.on_reply()
            if got and todo:
                push(got if self.window is not None else len(todo))
            if not got:
                time.sleep(POLL_S)
        return replies

    def train(
        self, jobs: Sequence[DeviceJob], states: Sequence[StateDict]
    ) -> list[tuple[DeviceResult, StateDict | None]]:
        replies = self._exchange(jobs, states)
        _check(self.stop)  # replies to a run being stopped do not make a completed round
        return [
            replies.pop(j.device)
            if j.device in replies
            else (DeviceResult(j.device, j.round, FAILED, "no reply in time"), None)
            for j in jobs
        ]


def wait_for_nodes(
    grid: Grid, wanted: int, timeout_s: float = 120.0, stop: threading.Event | None = None
) -> list[int]:
    """Node ids once ``wanted`` nodes have registered (virtual nodes appear asynchronously)."""
    end = time.monotonic() + timeout_s
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < wanted and time.monotonic() < end:
        _check(stop)
        time.sleep(POLL_S)
        node_ids = sorted(grid.get_node_ids())
    return node_ids


JOBS_PER_ACTOR = 2  # a simulation's jobs in flight per Ray actor (GridTransport's window)


def in_flight_window(spec: FleetSpec) -> int | None:
    """Jobs in flight for :class:`GridTransport`: in a simulation (Ray runs in this process)
    a couple per actor that fits the cluster, plus two; else ``None`` (the whole round)."""
    ray = running_ray()
    if ray is None:
        return None
    per_device = max(client_resources(spec)["num_cpus"], 1e-9)
    actors = max(1, int(float(ray.cluster_resources().get("CPU", 1)) // per_device))
    return JOBS_PER_ACTOR * actors + 2


def run_fleet(
    grid: Grid,
    spec: FleetSpec,
    cloud: str,
    storage: RunStorage,
    progress: Callable[[DeviceResult], None] | None = None,
    stop: threading.Event | None = None,
    records: RunRecords | None = None,
    on_round: Callable[[RunRecords], None] | None = None,
) -> RunRecords:
    """Plan the devices, map them onto the grid's nodes, and run every round.

    ``storage``: the run's device storage. ``records`` receives each round's rows as the round
    completes (what is left of a run that ``stop`` ends early); ``stop`` ends the run with
    :class:`RunStopped`.
    """
    node_ids = wait_for_nodes(grid, spec.num_devices, stop=stop)
    check_devices(spec, len(node_ids))
    records = RunRecords() if records is None else records
    records.timing["start"] = time.perf_counter()
    devices = plan_devices(spec)
    transport = GridTransport(grid, node_ids, stop=stop, window=in_flight_window(spec))
    transport.on_reply = getattr(progress, "tick", None)
    bars = getattr(progress, "bar", None) is not None  # the central reference's bars too
    runner = FleetRunner(spec, devices, cloud, storage, node_ids=node_ids, progress=bars)
    runner.run(transport.train, on_result=progress, records=records, on_round=on_round)
    records.timing["end"] = time.perf_counter()
    return records


def make_server_app(
    spec: FleetSpec,
    cloud: str,
    storage: RunStorage,
    outcome: FleetOutcome,
    progress: Callable[[DeviceResult], None] | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp around a ready spec whose rounds land in ``outcome``; ``stop`` ends it early."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        outcome.started = True
        try:
            run_fleet(grid, spec, cloud, storage, progress, stop, outcome.records)
            outcome.completed = True
        finally:
            outcome.done.set()

    return server


def settled_nodes(
    grid: Grid, settle_s: float = 1.0, timeout_s: float = 120.0, stop: threading.Event | None = None
) -> list[int]:
    """The grid's node ids once some have registered and none joined for ``settle_s``."""
    end = time.monotonic() + timeout_s
    nodes: list[int] = []
    since = time.monotonic()
    while time.monotonic() < end:
        _check(stop)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, since = now, time.monotonic()
        elif nodes and time.monotonic() - since >= settle_s:
            break
        time.sleep(POLL_S)
    return nodes


def wait_for_ray(timeout_s: float = 120.0, stop: threading.Event | None = None) -> None:
    """Until the runtime's Ray is up (Flower starts it in its main thread as the ServerApp
    starts): touching ``ray`` from this thread while that thread still imports it finds a
    partially initialised module (see :func:`~mist_fed.fleet.ray_env.running_ray`)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        _check(stop)
        if running_ray() is not None:
            return
        time.sleep(POLL_S)


def results_root(run_config: Mapping[str, Any]) -> Path:
    """``results-dir`` if absolute, else under the cache directory (never relative to the
    working directory of Flower's long-lived SuperLink, which is wherever it first started)."""
    given = Path(str(run_config.get("results-dir") or "results")).expanduser()
    return given if given.is_absolute() else cache_dir() / given


class _ToFlower(logging.Handler):
    """Our log records through Flower's logger, so ``flwr run --stream`` and ``flwr log``
    show the rounds."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("flwr").handle(record)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry of ``flwr run .``: Flower's runtime owns this process and Ray; the app owns the
    fleet, its cloud (embedded unless ``cloud`` names one), device storage and the results.

    ``devices = 0`` (the default) gives one device per SuperNode of the federation. Each
    completed round is written at once (``interrupted``/``rounds_completed`` in
    ``config.toml``); the finished run rewrites the files without them and adds the plots.
    """
    ours = logging.getLogger("mist_fed")
    if not any(isinstance(h, _ToFlower) for h in ours.handlers):
        ours.addHandler(_ToFlower())
        ours.setLevel(logging.INFO)
    stop, finished = threading.Event(), threading.Event()

    def on_exit() -> None:  # flwr stop, or a signal: end the fleet, then Ray (see flower.py)
        stop.set()
        if not finished.wait(EXIT_WAIT_S):
            log.warning("the fleet did not stop in %.0f s", EXIT_WAIT_S)
        ray = running_ray()
        if ray is not None:
            ray.shutdown()

    on_runtime_exit(on_exit)
    try:
        _run_app(grid, context, stop)
    finally:
        finished.set()


def _run_app(grid: Grid, context: Context, stop: threading.Event) -> None:
    rc = dict(context.run_config)
    nodes = settled_nodes(grid, stop=stop)
    wait_for_ray(stop=stop)
    if int(str(rc.get("devices") or 0)) <= 0:
        rc["devices"] = len(nodes)
    # Relative fleet paths resolve against the app's root (the installed FAB, or a checkout).
    app_root = Path(__file__).resolve().parents[2]
    spec = resolve_assets(spec_from_run_config(rc, base_dir=app_root))
    if spec.num_devices > len(nodes):
        raise ConfigError(
            f"the fleet has {spec.num_devices} devices but the federation {len(nodes)} "
            f'SuperNodes: run with --federation-config "num-supernodes={spec.num_devices}" '
            f"or --run-config devices={len(nodes)}"
        )
    cloud = str(rc.get("cloud") or "") or None
    results = results_root(rc)
    run_id = str(rc.get("run-id") or f"flwr-{context.run_id}")
    facts = {"engine": "flwr run", "flower_run_id": context.run_id, "cloud": cloud or "embedded"}
    log.info("fleet of %d devices; results in %s", spec.num_devices, results / run_id)
    t0 = time.perf_counter()
    records = RunRecords()

    def checkpoint(rec: RunRecords) -> None:
        done = {"interrupted": True, "rounds_completed": rec.fleets[-1]["round"]}
        wall = time.perf_counter() - t0
        finish_run(spec, rec, results, wall, {}, run_id, {**facts, **done}, plots=False)

    with device_storage() as storage, cloud_service(spec, cloud) as (location, stats):
        try:
            run_fleet(
                grid, spec, location, storage, stop=stop, records=records, on_round=checkpoint
            )
        except RunStopped:
            log.warning("run stopped; its completed rounds are in %s", results / run_id)
            return
        if running_ray() is not None:  # every job has replied: each node removes its copy
            clean_nodes(storage.name)  # (a stopped run's jobs may be busy: this machine's only)
        cloud_stats = stats()
    finish_run(spec, records, results, time.perf_counter() - t0, cloud_stats, run_id, facts)
