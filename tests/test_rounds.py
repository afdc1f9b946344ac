"""The round loop alone: a fake aggregator, a fake transport and a fake scorer; no Flower, no Ray,
no device, no cloud."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from mist_fed.fleet.aggregation import Update
from mist_fed.fleet.job import OK, DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.plan import FleetPlan
from mist_fed.fleet.rounds import IDLE_S, RoundState, SyncRounds
from mist_fed.fleet.scoring import CentralResult
from mist_fed.fleet.spec import FleetSpec, TaskFleet
from mist_fed.fleet.storage import RunStorage
from mist_fed.fleet.transport import Reply, RunStopped
from tests.fleets import hand_plan


class MeanOfFirst:
    """Samples the first ``n`` available devices; averages the updates, example-weighted."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[tuple[int, list[int]]] = []

    def sample(
        self,
        rnd: int,
        current: StateDict,
        available: Sequence[int],
        seed: int,
        wanted: int | None = None,
    ) -> tuple[list[int], dict[str, Any]]:
        self.calls.append((rnd, list(available)))
        return list(available)[: self.n if wanted is None else wanted], {"proximal-mu": 0.5}

    def aggregate(self, rnd: int, current: StateDict, updates: list[Update]) -> StateDict | None:
        total = sum(u.num_examples for u in updates)
        return {k: sum(u.state[k] * u.num_examples for u in updates) / total for k in current}

    def sampled(self, devices: int) -> int:
        return min(self.n, devices)


class AddsDevice:
    """Each device adds its number + 1 to every weight; replies in reverse order (or
    ``order``); device ``slow`` takes 100 device seconds."""

    def __init__(self, reverse: bool = True, slow: int | None = None) -> None:
        self.reverse, self.slow = reverse, slow
        self.sent: list[tuple[DeviceJob, StateDict]] = []
        self._jobs: list[tuple[DeviceJob, StateDict]] = []
        self.on_reply: Any = None

    def submit(self, jobs: Sequence[tuple[DeviceJob, StateDict]]) -> None:
        self._jobs.extend(jobs)
        self.sent.extend(jobs)

    def replies(self) -> Iterator[Reply]:
        jobs, self._jobs = self._jobs, []
        for job, state in reversed(jobs) if self.reverse else jobs:
            res = DeviceResult(job.device, job.round, OK, num_examples=job.device + 1)
            res.accuracy = 0.5
            res.metrics.compute_s = 100.0 if job.device == self.slow else 1.0
            if self.on_reply:
                self.on_reply()
            yield res, {k: v + job.device + 1 for k, v in state.items()}


class FakeScorer:
    """A zero initial model; a model's score is its mean weight."""

    def initial_state(self, fleet: TaskFleet, num_classes: int) -> StateDict:
        return {"w": torch.zeros(2)}

    def evaluate(self, fleet: TaskFleet, num_classes: int, state: StateDict) -> float:
        return float(state["w"].mean())

    def central(self, fleet: Any, num_classes: int, ids: Any, state: Any, epochs: int) -> Any:
        return CentralResult(0.25, 10 * epochs, epochs, len(ids), 0.0)


def _plan(devices: int = 3, **spec: Any) -> FleetPlan:
    fleet = TaskFleet("t", devices, name="f")
    s = FleetSpec(fleets=(fleet,), **{"rounds": 2, "local_epochs": 1, **spec})
    return hand_plan(s, train=1, test=1, eval_ids=("test-0",))


def _rounds(plan: FleetPlan, transport: Any, agg: Any, **kw: Any) -> SyncRounds:
    return SyncRounds(
        plan, transport, FakeScorer(), "fake://", RunStorage(Path("/nowhere"), "run-x"),  # type: ignore[arg-type]
        aggregators={"f": agg}, **kw,
    )  # fmt: skip


def test_a_round_samples_sends_aggregates_and_scores_through_the_protocols() -> None:
    # Prepare: 3 devices, the aggregator picks 2 a round
    agg, transport = MeanOfFirst(2), AddsDevice()
    seen: list[int] = []
    rounds = _rounds(_plan(), transport, agg, on_round=lambda s: seen.append(s.round))
    # Execute
    state = rounds.start()
    records = rounds.run(state)
    # Assert: round 1 from zeros: devices 0, 1 add 1 and 2, weighted 1:2 -> 5/3
    assert agg.calls == [(1, [0, 1, 2]), (2, [0, 1, 2])]
    assert [j.device for j, _ in transport.sent] == [0, 1, 0, 1]
    assert {j.proximal_mu for j, _ in transport.sent} == {0.5}  # the aggregator's config
    assert [j.storage for j, _ in transport.sent[:2]] == ["run-x/f/0", "run-x/f/1"]
    r1, r2 = (row["accuracy"] for row in records.fleets)
    assert r1 == pytest.approx(5 / 3) and r2 == pytest.approx(10 / 3)
    assert torch.equal(transport.sent[2][1]["w"], torch.full((2,), 5 / 3))  # round 2 starts there
    assert seen == [1, 2] and state.round == 2
    assert [row["sampled"] for row in records.fleets] == [2, 2]
    assert records.fleets[0]["central_accuracy"] == 0.25
    assert len({d["received_digest"] for d in records.devices if d["round"] == 2}) == 1


def test_the_order_replies_arrive_in_does_not_change_the_model() -> None:
    # Execute
    runs = []
    for reverse in (True, False):
        state = (rounds := _rounds(_plan(), AddsDevice(reverse), MeanOfFirst(3))).start()
        rounds.run(state)
        runs.append(state.global_state["f"]["w"])
    # Assert
    assert torch.equal(runs[0], runs[1])


def test_stragglers_and_dropouts_are_recorded_and_never_averaged_in() -> None:
    # Prepare: device 2 takes 100 s against a 10 s deadline; dropout draws are seeded
    plan = _plan(devices=6, deadline_s=10.0, availability="dropout:0.3", seed=1, rounds=1)
    transport = AddsDevice(slow=2)
    rounds = _rounds(plan, transport, MeanOfFirst(6))
    gone = plan.availability.dropped(list(range(6)), 1, 1)
    # Execute
    state = rounds.start()
    records = rounds.run(state)
    # Assert
    status = {d["device"]: d["status"] for d in records.devices}
    assert gone and {d for d, s in status.items() if s == "dropped"} == gone
    assert gone.isdisjoint(j.device for j, _ in transport.sent)
    assert 2 not in gone and status[2] == "straggler"
    kept = [d for d in range(6) if d not in gone and d != 2]
    want = sum((d + 1) * (d + 1) for d in kept) / sum(d + 1 for d in kept)
    assert float(state.global_state["f"]["w"][0]) == pytest.approx(want)
    row = records.fleets[0]
    assert row["stragglers"] == 1 and row["dropped"] == len(gone) and row["round_time_s"] == 10.0


def test_a_stop_between_rounds_keeps_whole_rounds_and_the_state_goes_on_from_there() -> None:
    # Prepare: the stop comes as round 1 is recorded
    stop = threading.Event()
    first = _rounds(_plan(rounds=3), AddsDevice(), MeanOfFirst(2), stop=stop,
                    on_round=lambda s: stop.set())  # fmt: skip
    state = first.start()
    # Execute
    with pytest.raises(RunStopped):
        first.run(state)
    kept = [dict(r) for r in state.records.fleets]
    # ... and a new loop goes on from the state (what a checkpoint of it would restore)
    second = _rounds(_plan(rounds=3), AddsDevice(), MeanOfFirst(2))
    second.run(state)
    whole: RoundState = (again := _rounds(_plan(rounds=3), AddsDevice(), MeanOfFirst(2))).start()
    again.run(whole)
    # Assert
    assert [r["round"] for r in kept] == [1]
    accs = [r["accuracy"] for r in state.records.fleets]
    assert accs == [r["accuracy"] for r in whole.records.fleets] and len(accs) == 3
    assert torch.equal(state.global_state["f"]["w"], whole.global_state["f"]["w"])


def _trace(tmp_path: Path, rows: str) -> str:
    path = tmp_path / "trace.csv"
    path.write_text("device,online\n" + rows)
    return str(path)


def test_only_available_devices_are_sampled_and_the_clock_moves_availability(
    tmp_path: Path,
) -> None:
    # Prepare: device 0 is online for the first 36 simulated seconds only, device 2 from
    # 0.01 h on, device 1 never (no row); device 0's round takes 100 s on the clock
    trace = _trace(tmp_path, "0,0-0.01\n2,0.01-5\n3,0-5\n")
    plan = _plan(devices=4, availability=f"trace:{trace}", rounds=2)
    agg, transport = MeanOfFirst(4), AddsDevice(slow=0)
    rounds = _rounds(plan, transport, agg)
    # Execute
    state = rounds.start()
    records = rounds.run(state)
    # Assert: round 1 offers devices 0 and 3; it lasts 100 s, so round 2 offers 2 and 3
    assert agg.calls == [(1, [0, 3]), (2, [2, 3])]
    sent = [(j.round, j.device) for j, _ in transport.sent]
    assert sent == [(1, 0), (1, 3), (2, 2), (2, 3)]
    assert [r["sim_time_s"] for r in records.fleets] == [100.0, 101.0]
    assert state.sim_s == 101.0 and 1 not in {d["device"] for d in records.devices}


def test_per_round_asks_the_aggregator_for_that_many_and_the_clock_idles_when_none_is_online(
    tmp_path: Path,
) -> None:
    # Prepare: 5 devices always online, 2 a round; then a fleet none of whose devices is online
    agg = MeanOfFirst(5)
    rounds = _rounds(_plan(devices=5, per_round=2, rounds=1), AddsDevice(), agg)
    late = _trace(tmp_path, "0,3-4\n")
    offline = _plan(devices=2, availability=f"trace:{late}", rounds=1)
    idle = _rounds(offline, AddsDevice(), MeanOfFirst(2))
    # Execute
    records = rounds.run(rounds.start())
    state = idle.start()
    empty = idle.run(state)
    # Assert
    assert [d["device"] for d in records.devices] == [0, 1]
    assert records.fleets[0]["sampled"] == 2 and records.fleets[0]["devices"] == 5
    assert empty.devices == [] and empty.fleets[0]["sampled"] == 0
    assert state.sim_s == IDLE_S
