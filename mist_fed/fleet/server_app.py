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
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from mist_fed.fleet.device import FAILED, DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.lifecycle import cloud_service, device_storage, finish_run, resolve_assets
from mist_fed.fleet.messages import job_message, unpack_train_reply
from mist_fed.fleet.runner import FleetRunner, RunRecords, check_devices, plan_devices
from mist_fed.fleet.spec import FleetSpec, spec_from_run_config

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger(__name__)

POLL_S = 0.05


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
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from mist_fed.fleet.ray_env import client_resources

    per_device = max(client_resources(spec)["num_cpus"], 1e-9)
    actors = max(1, int(float(ray.cluster_resources().get("CPU", 1)) // per_device))
    return JOBS_PER_ACTOR * actors + 2


def run_fleet(
    grid: Grid,
    spec: FleetSpec,
    cloud: str,
    storage: str | Path,
    progress: Callable[[DeviceResult], None] | None = None,
    stop: threading.Event | None = None,
    records: RunRecords | None = None,
) -> RunRecords:
    """Plan the devices, map them onto the grid's nodes, and run every round.

    ``storage``: the root of the devices' own directories. ``records`` receives each round's
    rows as the round completes (what is left of a run that ``stop`` ends early); ``stop`` ends
    the run with :class:`RunStopped`.
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
    runner.run(transport.train, on_result=progress, records=records)
    records.timing["end"] = time.perf_counter()
    return records


def make_server_app(
    spec: FleetSpec,
    cloud: str,
    storage: str | Path,
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


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry of ``flwr run .``: run-config -> spec, then the same path as ``simulate``."""
    # Relative fleet paths resolve against the app's root (the FAB, or this checkout).
    app_root = Path(__file__).resolve().parents[2]
    spec = resolve_assets(spec_from_run_config(context.run_config, base_dir=app_root))
    cloud = str(context.run_config.get("cloud", "") or "")
    results = Path(str(context.run_config.get("results-dir", "results")))
    t0 = time.perf_counter()
    with device_storage() as storage, cloud_service(spec, cloud or None) as (location, stats):
        records = run_fleet(grid, spec, location, storage)
        cloud_stats = stats()
    finish_run(spec, records, results, wall_s=time.perf_counter() - t0, cloud_stats=cloud_stats)
