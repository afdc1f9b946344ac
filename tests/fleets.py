"""Fleet rounds without Flower or Ray: a plan made by hand, transports and scorers to drive.

``hand_plan`` gives each fleet's devices their own ``train-*``/``test-*`` ids (the
ids :class:`tests.fakes.MemorySource` serves); ``FnTransport`` hands each round's jobs to a
plain function; ``StubScorer`` scores a model by a fixed rule and skips the central training;
``make_rounds`` wires them into the real :class:`~mist_fed.fleet.rounds.SyncRounds`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mist_fed.fleet.availability import parse
from mist_fed.fleet.job import DeviceJob, StateDict
from mist_fed.fleet.partition import shares
from mist_fed.fleet.plan import FleetData, FleetPlan
from mist_fed.fleet.rounds import RoundState, RunRecords, SyncRounds
from mist_fed.fleet.scoring import CentralResult, Scorer
from mist_fed.fleet.spec import FleetSpec, TaskFleet
from mist_fed.fleet.storage import RunStorage
from mist_fed.fleet.transport import Reply

TrainFn = Callable[[Sequence[DeviceJob], Sequence[StateDict]], list[Reply]]


def hand_plan(
    spec: FleetSpec,
    train: int = 6,
    test: int = 1,
    eval_ids: Sequence[str] = ("test-0",),
    num_classes: int = 3,
    profiles: Sequence[int] | None = None,
) -> FleetPlan:
    """Device ``d`` of each fleet holds ``train-{train*d}..`` and ``test-{test*d}..`` (its
    number within its fleet; Flower Datasets' IID partitioner over a pool in order: contiguous
    shards); ``profiles``: each device's index into the spec's profile mix (default: the first)."""
    fleets, first = {}, 0
    for fleet in spec.fleets:
        n = fleet.devices
        parts = shares([0] * (train * n), np.arange(train * n), "Iid", {}, n, 0)
        fleets[fleet.name] = FleetData(
            fleet, first, n, fleet.task, num_classes, [f"train-{i}" for i in range(train * n)],
            [f"test-{i}" for i in range(test * n)], list(range(test * n)), parts,
        )  # fmt: skip
        first += n
    avail = parse(spec.availability).bind(first)
    index = np.zeros(first, np.uint8) if profiles is None else np.asarray(profiles, np.uint8)
    evals = {f.task: tuple(eval_ids) for f in spec.fleets}
    return FleetPlan(spec, fleets, evals, avail, index)


class FnTransport:
    """Each round's jobs to ``train(jobs, states)``, its replies back."""

    def __init__(self, train: TrainFn) -> None:
        self.train = train
        self._jobs: list[tuple[DeviceJob, StateDict]] = []

    def submit(self, jobs: Sequence[tuple[DeviceJob, StateDict]]) -> None:
        self._jobs.extend(jobs)

    def replies(self) -> Iterator[Reply]:
        jobs, self._jobs = self._jobs, []
        yield from self.train([j for j, _ in jobs], [s for _, s in jobs])


class StubScorer(Scorer):
    """Initial models as the real scorer makes them; a model's score is its first tensor's
    mean, and the central reference is skipped (its epochs recorded)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.centrals: list[int] = []

    def evaluate(self, fleet: TaskFleet, num_classes: int, state: StateDict) -> float:
        return float(next(iter(state.values())).float().mean())

    def central(self, fleet: Any, num_classes: int, ids: Any, state: Any, epochs: int) -> Any:
        self.centrals.append(epochs)
        return CentralResult(math.nan, 0, epochs, len(ids), 0.0)


def make_rounds(
    plan: FleetPlan,
    train: TrainFn,
    source: Any,
    tmp_path: Path,
    stub: bool = True,
    **kw: Any,
) -> SyncRounds:
    """The real round loop over ``train`` on ``source`` (a MemorySource), storage in
    ``tmp_path/run-test``; ``stub``: a :class:`StubScorer` instead of the real one."""
    run = RunStorage(tmp_path, "run-test")
    scorer = (StubScorer if stub else Scorer)(plan, "memory://", run.path / "_server", source)
    return SyncRounds(plan, FnTransport(train), scorer, "memory://", run, **kw)


def run_all(rounds: SyncRounds) -> tuple[RunRecords, RoundState]:
    """Every round; the records and the final state."""
    state = rounds.start()
    rounds.run(state)
    return state.records, state
