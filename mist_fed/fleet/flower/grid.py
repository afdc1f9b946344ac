"""The round loop's :class:`~mist_fed.fleet.transport.Transport` over a Flower Grid: jobs out as
Messages to the devices' ClientApps, replies back; and the waits for the Grid's nodes.

Every wait here looks at the run's stop (an event, :mod:`mist_fed.fleet.runtime.stop`) each
:data:`~mist_fed.fleet.runtime.stop.POLL_S`, and ends with
:class:`~mist_fed.fleet.transport.RunStopped` once it is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from mist_fed.errors import MistError
from mist_fed.fleet.flower.messages import job_message, unpack_train_reply
from mist_fed.fleet.job import FAILED, DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.runtime.cluster import client_resources, running_ray
from mist_fed.fleet.runtime.stop import POLL_S
from mist_fed.fleet.spec import FleetSpec
from mist_fed.fleet.transport import Reply, RunStopped

JOBS_PER_ACTOR = 2  # a simulation's jobs in flight per Ray actor (GridTransport's window)
QUIET_LOG_S = 60.0  # a wait for replies says so after this long without one

log = logging.getLogger(__name__)


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunStopped("the fleet run was stopped")


class GridTransport:
    """Device jobs through a Flower Grid: device ``d`` is the Grid's node ``node_ids[d]`` when
    the Grid has a node for every device of the population (real SuperNodes, one a device);
    with fewer nodes (a simulation of a large population sampled per round) the nodes are
    slots: a round's ``i``-th job goes to node ``node_ids[i % len(node_ids)]``, and since the
    ClientApp keeps nothing between jobs and a device's files are named by its job's storage,
    any node runs any device.

    ``window``: at most this many jobs in flight (pushed, not yet answered); a reply makes
    room for the next. In a simulation the devices run a few at a time (one per Ray actor)
    whatever is pushed, and Flower's in-memory runtime scans every stored message for every
    node on each of its 0.1 s sweeps: with a whole 1,000-device round pushed at once that
    scan alone is a million checks a sweep. A window of a few jobs per actor keeps the
    actors busy and the scan short; ``None`` pushes every job at once (real SuperNodes, each
    pulling its own job). ``timeout_s``: a job not answered by then comes back ``failed``.
    ``stop``, once set, ends a wait for replies, so the ServerApp thread does not outlive a
    simulation runtime that was interrupted. No wait is silent: every :data:`QUIET_LOG_S`
    without a reply says how many are missing, and with ``needs_ray`` (a simulation, whose
    devices run on this process's Ray) a Ray that has gone ends the wait with an error.
    """

    def __init__(
        self,
        grid: Grid,
        node_ids: Sequence[int],
        timeout_s: float | None = None,
        stop: threading.Event | None = None,
        window: int | None = None,
        needs_ray: bool = False,
    ):
        self.grid = grid
        self.needs_ray = needs_ray
        self.node_ids = list(node_ids)
        self.timeout_s = timeout_s
        self.stop = stop
        self.window = window
        self.on_reply: Callable[[], None] | None = None
        self._todo: deque[tuple[DeviceJob, StateDict, int]] = deque()
        self._job_of: dict[str, DeviceJob] = {}  # message id -> job, while in flight
        self._weights: dict[int, ArrayRecord] = {}  # one serialized copy per distinct state

    def submit(self, jobs: Sequence[tuple[DeviceJob, StateDict]]) -> None:
        by_device = all(j.device < len(self.node_ids) for j, _ in jobs)
        for i, (j, s) in enumerate(jobs):
            node = self.node_ids[j.device if by_device else i % len(self.node_ids)]
            self._todo.append((j, s, node))

    def _push(self, n: int) -> None:
        batch = [self._todo.popleft() for _ in range(min(n, len(self._todo)))]
        msgs = []
        for j, s, node in batch:
            arrays = self._weights.get(id(s))
            if arrays is None:
                arrays = self._weights[id(s)] = ArrayRecord.from_torch_state_dict(s)
            msgs.append(job_message(j, arrays, node))
        ids = list(self.grid.push_messages(msgs))
        self._job_of.update(zip(ids, (j for j, _, _ in batch), strict=True))
        # A serialized copy lives while a job still to push needs it (an asynchronous fleet
        # sends many models through one ``replies``; an id is unique only while its state lives,
        # and the queued jobs keep theirs alive).
        queued = {id(s) for _, s, _ in self._todo}
        self._weights = {k: v for k, v in self._weights.items() if k in queued}

    def replies(self) -> Iterator[Reply]:
        """Each device's unpacked reply (a Message is dropped as soon as it is read)."""
        self._push(len(self._todo) if self.window is None else self.window)
        end = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        quiet_since = time.monotonic()
        try:
            while self._job_of and (end is None or time.monotonic() < end):
                _check(self.stop)
                if time.monotonic() - quiet_since > QUIET_LOG_S:
                    self._still_waiting(quiet_since)
                    quiet_since = time.monotonic()
                got = 0
                for m in self.grid.pull_messages(list(self._job_of)):
                    job = self._job_of.pop(m.metadata.reply_to_message_id)
                    got += 1
                    if self.on_reply:
                        self.on_reply()
                    yield unpack_train_reply(m, job)
                if got:
                    quiet_since = time.monotonic()
                if got and self._todo:
                    self._push(got if self.window is not None else len(self._todo))
                if not got:
                    time.sleep(POLL_S)
            late = [*self._job_of.values(), *(j for j, _, _ in self._todo)]
            for job in sorted(late, key=lambda j: j.device):
                yield DeviceResult(job.device, job.round, FAILED, "no reply in time"), None
        finally:
            self._todo.clear()
            self._job_of.clear()
            self._weights.clear()

    def _still_waiting(self, since: float) -> None:
        waiting = len(self._job_of) + len(self._todo)
        if self.needs_ray and running_ray() is None:
            raise MistError(
                f"the simulation's Ray runtime is gone with {waiting} device job(s) "
                "unanswered; see the run's log (flwr log RUN_ID, or -v)"
            )
        log.info(
            "waiting for %d device job(s); no reply for %.0f s", waiting, time.monotonic() - since
        )


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


def in_flight_window(spec: FleetSpec) -> int | None:
    """Jobs in flight for :class:`GridTransport`: in a simulation (Ray runs in this process)
    a couple per actor that fits the cluster, plus two; else ``None`` (the whole round)."""
    ray = running_ray()
    if ray is None:
        return None
    per_device = max(client_resources(spec)["num_cpus"], 1e-9)
    actors = max(1, int(float(ray.cluster_resources().get("CPU", 1)) // per_device))
    return JOBS_PER_ACTOR * actors + 2
