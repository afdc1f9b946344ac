"""The event-driven loop of asynchronous fleets alone: FedBuff and FedAsync on the virtual clock,
over a fake transport and a fake scorer; no Flower, no Ray, no device, no cloud."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from mist_fed.errors import ConfigError, MistError
from mist_fed.fleet import aggregation
from mist_fed.fleet.aggregation import Update
from mist_fed.fleet.async_aggregation import FedAsync, FedBuff, staleness_weight
from mist_fed.fleet.async_rounds import AsyncRounds
from mist_fed.fleet.job import OK, STRAGGLER, DeviceJob, DeviceResult, StateDict
from mist_fed.fleet.plan import FleetPlan
from mist_fed.fleet.rounds import RoundState, SyncRounds
from mist_fed.fleet.spec import FleetSpec, TaskFleet, apply_overrides
from mist_fed.fleet.storage import RunStorage
from mist_fed.fleet.transport import Reply
from tests.fleets import hand_plan
from tests.test_rounds import FakeScorer, MeanOfFirst


class ClockedDevices:
    """Device ``d`` takes ``seconds[d]`` device seconds (default 10 + d) and returns
    ``0.5 * w + d + 1`` (so an update depends on the model it started from). Among the jobs
    in flight it answers first the last submitted (``order="reverse"``), or the first to
    finish in simulated time (``"simulated"``: it is told each job's start)."""

    def __init__(self, order: str = "simulated", seconds: dict[int, float] | None = None):
        self.order, self.seconds = order, seconds or {}
        self.queue: list[tuple[DeviceJob, StateDict]] = []
        self.submitted: list[DeviceJob] = []
        self.most_in_flight = 0
        self.starts: dict[int, float] = {}  # job number -> simulated start (set by the test)

    def duration(self, device: int) -> float:
        return self.seconds.get(device, 10.0 + device)

    def submit(self, jobs: Sequence[tuple[DeviceJob, StateDict]]) -> None:
        self.queue.extend(jobs)
        self.submitted.extend(j for j, _ in jobs)
        self.most_in_flight = max(self.most_in_flight, len(self.queue))

    def replies(self) -> Iterator[Reply]:
        while self.queue:
            if self.order == "reverse":
                job, state = self.queue.pop()
            else:  # the earliest simulated finish first
                i = min(range(len(self.queue)), key=lambda i: self._end(self.queue[i][0]))
                job, state = self.queue.pop(i)
            res = DeviceResult(job.device, job.round, OK, num_examples=job.device + 1)
            res.metrics.compute_s = self.duration(job.device)
            yield res, {k: 0.5 * v + job.device + 1 for k, v in state.items()}

    def _end(self, job: DeviceJob) -> tuple[float, int]:
        return self.starts.get(job.round, 0.0) + self.duration(job.device), job.device


def _plan(devices: int = 4, rounds: int = 3, fleets: Sequence[TaskFleet] = (), **spec: Any):
    fleets = tuple(fleets) or (TaskFleet("t", devices, name="a", aggregation="FedBuff"),)
    s = FleetSpec(fleets=fleets, **{"rounds": rounds, "local_epochs": 1, **spec})
    return hand_plan(s, train=1, num_classes=2)


def _run(plan: FleetPlan, transport: Any, aggs: dict[str, Any], sync: dict[str, Any] | None = None):
    rounds = SyncRounds(
        plan, transport, FakeScorer(), "fake://", RunStorage(Path("/nowhere"), "run-x"),  # type: ignore[arg-type]
        aggregators=sync or {}, async_aggregators=aggs,
    )  # fmt: skip
    state = rounds.start()
    rounds.run(state)
    engine = AsyncRounds(rounds)
    if isinstance(transport, ClockedDevices):  # the fake learns each job's simulated start
        fill = engine._fill

        def noting(state: RoundState, fs: Any, name: str, agg: Any) -> None:
            fill(state, fs, name, agg)
            for fl in fs.in_flight.values():
                transport.starts.setdefault(fl.job.round, fl.start_s)

        engine._fill = noting  # type: ignore[method-assign]
    engine.run(state)
    return state


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal rows, NaN equal to NaN."""
    return pd.DataFrame(a).equals(pd.DataFrame(b))


def _buff(**args: Any) -> FedBuff:
    return FedBuff(args, 4)


# -- staleness and the server steps -----------------------------------------------------------


def test_staleness_weights_are_polynomial_or_constant() -> None:
    assert staleness_weight("polynomial", 0.5, 0) == 1.0
    assert staleness_weight("polynomial", 0.5, 3) == pytest.approx(0.5)  # 1/sqrt(1+3)
    assert staleness_weight("polynomial", 1.0, 4) == pytest.approx(0.2)
    assert staleness_weight("constant", 0.5, 7) == 1.0
    with pytest.raises(ValueError):
        staleness_weight("polynomial", 0.5, -1)


def test_fedbuff_step_weights_each_delta_by_examples_and_staleness() -> None:
    # Prepare: two updates from different bases, staleness 0 and 3 (weights 1 and 1/2)
    current = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor([5])}
    a = Update(0, {"w": torch.tensor([3.0, 1.0])}, 1, 0, {"w": torch.tensor([1.0, 1.0])})
    b = Update(1, {"w": torch.tensor([0.0, 4.0])}, 3, 3, {"w": torch.tensor([0.0, 0.0])})
    # Execute
    new = _buff(server_lr=2.0).step(current, [a, b])
    # Assert: delta = (1*1*[2,0] + 3*0.5*[0,4]) / 4 = [0.5, 1.5]; w + 2 * delta
    assert torch.allclose(new["w"], torch.tensor([2.0, 4.0]))
    assert new["w"].dtype == torch.float32 and torch.equal(new["n"], current["n"])
    const = _buff(staleness="constant").step(current, [a, b])
    assert torch.allclose(const["w"], current["w"] + torch.tensor([0.5, 3.0]))


def test_fedasync_mixes_each_update_by_a_staleness_weight() -> None:
    current = {"w": torch.tensor([0.0])}
    u = Update(0, {"w": torch.tensor([8.0])}, 1, 3)
    new = FedAsync({"alpha": 0.5}, 4).step(current, [u])
    assert torch.allclose(new["w"], torch.tensor([2.0]))  # a = 0.5 / sqrt(4) = 0.25


def test_the_buffer_flushes_at_k_and_staleness_is_counted_in_server_steps() -> None:
    # Prepare: 4 devices (10, 11, 12, 13 s), K = 2, all train at once
    plan, transport = _plan(rounds=3), ClockedDevices()
    # Execute
    state = _run(plan, transport, {"a": _buff(buffer_size=2)})
    rec = state.records
    # Assert: each step consumed 2 updates, at the simulated second its second one ended
    assert [r["round"] for r in rec.fleets] == [1, 2, 3]
    assert [r["ok"] for r in rec.fleets] == [2, 2, 2]
    assert [r["sim_time_s"] for r in rec.fleets] == [11.0, 13.0, 22.0]
    by_step = [[(d["device"], d["staleness"]) for d in rec.devices if d["round"] == s]
               for s in (1, 2, 3)]  # fmt: skip
    # devices 0, 1 restart at 10 and 11 s from versions 0 and 1; 2, 3 started at 0
    assert by_step == [[(0, 0), (1, 0)], [(2, 1), (3, 1)], [(0, 2), (1, 1)]]
    assert rec.fleets[1]["staleness_mean"] == 1.0 and rec.fleets[2]["staleness_max"] == 2.0
    assert rec.devices[4]["sim_start_s"] == 10.0 and rec.devices[4]["sim_end_s"] == 20.0


def test_updates_older_than_max_staleness_are_dropped() -> None:
    # Prepare: device 3 is slow (100 s); K = 1, so every reply is a step
    plan = _plan(rounds=40)
    transport = ClockedDevices(seconds={3: 100.0})
    # Execute
    state = _run(plan, transport, {"a": _buff(buffer_size=1, max_staleness=5)})
    # Assert: nothing staler than 5 is averaged; the slow device's update comes back stale
    rows = state.records.devices
    assert all(r["staleness"] <= 5 for r in rows if r["status"] == OK)
    assert max(r["staleness"] for r in rows) > 5
    stale = [r for r in rows if r["status"] == STRAGGLER]
    assert stale and all("max_staleness 5" in r["reason"] for r in stale)
    assert all(r["device"] == 3 for r in stale)


def test_the_concurrency_cap_holds_in_simulated_time() -> None:
    # Prepare: 6 devices, at most 2 training at once
    plan, transport = _plan(devices=6, rounds=5), ClockedDevices()
    # Execute
    state = _run(plan, transport, {"a": _buff(buffer_size=1, max_concurrency=2)})
    # Assert: never more than 2 submitted jobs outstanding; no instant with 3 jobs running
    assert transport.most_in_flight <= 2
    spans = [(r["sim_start_s"], r["sim_end_s"]) for r in state.records.devices]
    for t in {s for s, _ in spans}:
        assert sum(s <= t < e for s, e in spans) <= 2
    assert len({r["device"] for r in state.records.devices}) > 2  # slots pass between devices


def test_one_straggler_never_blocks_the_server() -> None:
    # Prepare: device 0 takes 10,000 s, the others 10-13 s
    plan = _plan(rounds=6)
    transport = ClockedDevices(seconds={0: 10_000.0})
    # Execute
    state = _run(plan, transport, {"a": _buff(buffer_size=2)})
    # Assert: every step is made long before the straggler could finish
    fleets = state.records.fleets
    assert len(fleets) == 6 and fleets[-1]["sim_time_s"] < 100
    assert 0 not in {r["device"] for r in state.records.devices}


def test_reverse_replies_give_the_model_of_replies_in_simulated_order() -> None:
    # Prepare: the same fleet, one transport answering in simulated order, one in reverse
    runs = []
    for order in ("simulated", "reverse"):
        plan = _plan(devices=5, rounds=4)
        transport = ClockedDevices(order, seconds={2: 35.0, 4: 7.0})
        runs.append(_run(plan, transport, {"a": _buff(buffer_size=2, max_concurrency=4)}))
    # Assert: the same model, the same steps and the same device rows
    first, second = runs
    assert torch.equal(first.global_state["a"]["w"], second.global_state["a"]["w"])
    assert _same(first.records.fleets, second.records.fleets)
    assert _same(first.records.devices, second.records.devices)


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    def run(seed: int) -> RoundState:
        plan = _plan(devices=6, rounds=5, seed=seed)
        return _run(plan, ClockedDevices(), {"a": _buff(buffer_size=2, max_concurrency=3)})

    a, b, c = run(1), run(1), run(2)
    assert _same(a.records.devices, b.records.devices) and _same(a.records.fleets, b.records.fleets)
    assert torch.equal(a.global_state["a"]["w"], b.global_state["a"]["w"])
    picked = [[r["device"] for r in s.records.devices] for s in (a, c)]
    assert picked[0] != picked[1]  # the seed draws which idle devices start


def test_a_sync_and_an_async_fleet_run_in_one_run() -> None:
    # Prepare: two synchronous fleets (2 of 3 a round; one for 1 round) and a FedBuff fleet
    # of the same task, for 3 server steps
    fleets = (
        TaskFleet("t", 3, name="sync"),
        TaskFleet("t", 3, name="short", rounds=1),
        TaskFleet(
            "t", 3, name="async", aggregation="FedBuff", aggregation_args={"buffer_size": 2},
            rounds=3,
        ),
    )  # fmt: skip
    plan = _plan(rounds=2, fleets=fleets)
    transport = ClockedDevices()
    # Execute: the asynchronous fleet's aggregator is built from its name
    rounds = SyncRounds(
        plan, transport, FakeScorer(), "fake://", RunStorage(Path("/nowhere"), "run-x"),  # type: ignore[arg-type]
        aggregators={"sync": MeanOfFirst(2), "short": MeanOfFirst(2)},
    )  # fmt: skip
    state = rounds.start()
    rounds.run(state)
    AsyncRounds(rounds).run(state)
    # Assert: both fleets have two rows, each with its own clock; staleness only asynchronous
    rows = {n: [r for r in state.records.fleets if r["fleet"] == n] for n in ("sync", "async")}
    assert [r["round"] for r in rows["sync"]] == [1, 2]
    assert [r["round"] for r in rows["async"]] == [1, 2, 3]
    assert [r["round"] for r in state.records.fleets if r["fleet"] == "short"] == [1]
    assert isinstance(rounds.async_aggregators["async"], FedBuff)
    assert rows["sync"][0]["staleness_mean"] != rows["sync"][0]["staleness_mean"]  # NaN
    assert rows["async"][1]["staleness_mean"] >= 0
    assert set(state.records.final_states) == {"sync", "short", "async"}


def test_a_fleet_waits_for_devices_to_come_online_and_none_ever_is_one_clear_error() -> None:
    def rounds_with(online: Any) -> SyncRounds:
        rounds = SyncRounds(
            _plan(rounds=2), ClockedDevices(), FakeScorer(), "fake://",
            RunStorage(Path("/nowhere"), "r"), async_aggregators={"a": _buff(buffer_size=2)},  # type: ignore[arg-type]
        )  # fmt: skip
        rounds.available = online  # type: ignore[method-assign]
        return rounds

    # Execute: devices online only from simulated hour 3; then none, ever
    later = rounds_with(lambda fleet, rnd, sim_s: [0, 1, 2, 3] if sim_s >= 3 * 3600 else [])
    state = later.start()
    AsyncRounds(later).run(state)
    never = rounds_with(lambda fleet, rnd, sim_s: [])
    # Assert: the first jobs start once devices are online (the clock waits in idle steps)
    starts = [r["sim_start_s"] for r in state.records.devices]
    assert len(state.records.fleets) == 2 and min(starts) >= 3 * 3600
    with pytest.raises(MistError, match="no device was available for 14 simulated days"):
        AsyncRounds(never).run(never.start())


# -- names and arguments ----------------------------------------------------------------------


def test_async_aggregations_are_named_like_flower_strategies_and_refused_clearly() -> None:
    f = TaskFleet("t", 4, aggregation="fedbuff", aggregation_args={"buffer_size": 3})
    assert f.aggregation == "FedBuff" and aggregation.is_async("FEDASYNC")
    assert not aggregation.is_async("FedAvg")
    bad = [
        ({"buffer_size": 0}, "buffer_size must be an integer >= 1, got 0"),
        ({"buffer_size": 2.5}, "buffer_size must be an integer >= 1"),
        ({"staleness": "hinge"}, "staleness must be one of polynomial, constant"),
        ({"max_concurrency": True}, "max_concurrency must be an integer >= 1"),
        ({"eta": 0.1}, "takes no argument(s) eta; it takes buffer_size"),
    ]
    for args, message in bad:
        with pytest.raises(ConfigError) as e:
            TaskFleet("t", 4, aggregation="FedBuff", aggregation_args=args)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="alpha must be in"):
        TaskFleet("t", 4, aggregation="FedAsync", aggregation_args={"alpha": 1.5})
    with pytest.raises(ConfigError, match="a dropout applies to rounds"):
        FleetSpec(fleets=(f,), availability="dropout:0.1")


def test_the_cli_names_an_async_fleet_with_its_json_args() -> None:
    spec = FleetSpec(fleets=(TaskFleet("t", 4),))
    over = apply_overrides(
        spec, aggregation="FedBuff", aggregation_args='{"buffer_size": 2, "max_concurrency": 3}'
    )
    assert over.fleets[0].aggregation == "FedBuff"
    assert over.fleets[0].aggregation_args == {"buffer_size": 2, "max_concurrency": 3}
    with pytest.raises(ConfigError, match="buffer_size must be"):
        apply_overrides(spec, aggregation="FedBuff", aggregation_args='{"buffer_size": -1}')


# -- real devices (in memory) and the report ---------------------------------------------------


def test_a_fedbuff_fleet_of_real_devices_records_steps_staleness_and_plots(tmp_path: Path) -> None:
    # Prepare: 7 devices on mixed profiles training a linear head from a memory source
    from mist_fed.fleet.spec import spec_from_dict, spec_to_dict
    from mist_fed.fleet.worker import run_device
    from mist_fed.report.plots import plot_run
    from mist_fed.report.results import device_frame, fleet_frame, write_run
    from tests.fakes import MemorySource
    from tests.fleets import make_rounds

    fleets = [{"task": "synthetic", "devices": 7, "method": "linear", "aggregation": "FedBuff",
               "aggregation_args": {"buffer_size": 3, "max_concurrency": 5}}]  # fmt: skip
    spec = spec_from_dict({"fleets": fleets, "profiles": "rpi4:1,phone-low:1,jetson-nano:1", "rounds": 4, "batch_size": 4,
                           "lr": 0.05, "eval_images": 16, "local_epochs": 1})  # fmt: skip
    src = MemorySource(rows={"train": 48, "val": 24, "test": 16})

    def train(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
        return [
            run_device(j, s, lambda c, **kw: src, tmp_path)
            for j, s in zip(jobs, states, strict=True)
        ]

    plan = hand_plan(spec, eval_ids=[f"test-{i}" for i in range(16)], profiles=[0, 1, 2] * 3)
    rounds = make_rounds(plan, train, lambda c, **kw: src, tmp_path, stub=False)
    state = rounds.start()
    # Execute
    rounds.run(state)  # no synchronous fleet: nothing
    AsyncRounds(rounds).run(state)
    rec = state.records
    paths = write_run(tmp_path / "run", spec_to_dict(spec), rec.devices, rec.fleets, {})
    plots = plot_run(tmp_path / "run", device_frame(rec.devices), fleet_frame(rec.fleets))
    # Assert: 4 server steps of 3 updates each, on a clock that only moves forward
    assert [r["round"] for r in rec.fleets] == [1, 2, 3, 4]
    assert all(r["ok"] == 3 and 0 <= r["accuracy"] <= 1 for r in rec.fleets)
    times = [r["sim_time_s"] for r in rec.fleets]
    assert times == sorted(times) and times[0] > 0
    ends = [d["sim_end_s"] for d in rec.devices]
    assert ends == sorted(ends)  # consumed in simulated order
    assert {d["staleness"] for d in rec.devices} - {0}  # some updates were stale
    assert (tmp_path / "run" / "staleness.png") in plots
    summary = paths["summary"].read_text()
    assert "## Time to accuracy in simulated hours" in summary and "FedBuff" in summary
    frame = pd.read_parquet(paths["devices"])
    assert frame["staleness"].notna().all() and (frame["sim_end_s"] > frame["sim_start_s"]).all()


# -- resume ------------------------------------------------------------------------------------


def _deterministic(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list:
    """Devices whose update and duration depend on their device and job number only."""
    out = []
    for job, st in zip(jobs, states, strict=True):
        g = torch.Generator().manual_seed(job.device * 100 + job.round)
        res = DeviceResult(job.device, job.round, OK, num_examples=job.device + 1)
        res.metrics.compute_s = 5.0 + 7.0 * job.device + job.round % 3
        out.append((res, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in st.items()}))
    return out


@pytest.mark.parametrize("after", [1, 3])
def test_an_async_fleet_resumed_after_a_server_step_matches_the_run_that_never_stopped(
    tmp_path: Path, after: int
) -> None:
    # Prepare: FedBuff, 4 of 6 devices training at once, so jobs are in flight at each step
    from mist_fed.fleet.state import snapshot
    from tests.fakes import MemorySource
    from tests.fleets import make_rounds
    from tests.test_resume import _through_a_file

    fleet = TaskFleet("t", 6, name="a", aggregation="FedBuff",
                      aggregation_args={"buffer_size": 2, "max_concurrency": 4})  # fmt: skip
    plan = hand_plan(FleetSpec(fleets=(fleet,), rounds=5, local_epochs=1), train=1)
    src = MemorySource()
    saved: list[dict[str, Any]] = []
    whole = make_rounds(plan, _deterministic, lambda c, **kw: src, tmp_path / "a")
    state = whole.start()
    AsyncRounds(whole, on_step=lambda s: saved.append(snapshot(s, whole.providers))).run(state)
    # Execute: a new engine from the checkpoint after step ``after``
    again = make_rounds(plan, _deterministic, lambda c, **kw: src, tmp_path / "b")
    resumed = again.resume(_through_a_file(saved[after - 1]))  # type: ignore[arg-type]
    waiting = resumed.asynchronous["a"]
    assert waiting.finished and not waiting.in_flight  # replies waiting for their turn, saved
    AsyncRounds(again).run(resumed)
    # Assert: the same steps, updates and model as the run that never stopped
    assert _same(resumed.records.fleets, state.records.fleets)
    assert _same(resumed.records.devices, state.records.devices)
    a, b = resumed.global_state["a"], state.global_state["a"]
    assert all(torch.equal(a[k], b[k]) for k in a)
