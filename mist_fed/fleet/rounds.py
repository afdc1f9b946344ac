"""The synchronous round loop over two small protocols: a
:class:`~mist_fed.fleet.transport.Transport` that carries device jobs and brings their replies
back, and each fleet's
:class:`~mist_fed.fleet.aggregation.Aggregator`.

A round (:meth:`SyncRounds.round`): each federated fleet's aggregator samples (``per_round``,
through the aggregator's own sampling: Flower's strategies') among the devices its availability
model has online at the run's simulated time (:meth:`SyncRounds.available`); a device's job is
made only then (:meth:`~mist_fed.fleet.plan.FleetPlan.job`); the sampled devices that drop out
are recorded and sent nothing; the others
get their job and the model they start from; replies arrive in any order; an ``ok`` reply past
the deadline becomes a straggler (never averaged in); each federated fleet aggregates its ``ok``
replies into a new global model, which the server scores
(:class:`~mist_fed.fleet.scoring.Scorer`); a local fleet's devices keep their own models.
The round's rows land in the :class:`RoundState` together, and ``on_round`` sees the state after
every round: the run session writes its tables there (a checkpoint: a run stopped mid-round
keeps whole rounds).

Everything one round changes lives in :class:`RoundState` (global and device models, clocks,
the run's simulated time, records, asynchronous fleets' event state), so the event-driven loop
of asynchronous fleets (:class:`~mist_fed.fleet.async_rounds.AsyncRounds`, over the same
transport, scorer and state) sits beside :class:`SyncRounds`, and a run can resume from a saved
state. :class:`SyncRounds` runs the synchronous fleets' rounds (FedAvg and every Flower
strategy, ``local``); it also starts every fleet (initial model, central reference) and builds
every fleet's aggregator, asynchronous ones included, which it leaves to the event-driven loop.
No Flower and no Ray: the Flower Grid (:mod:`mist_fed.fleet.flower.grid`) and the
in-process loop (:class:`~mist_fed.fleet.worker.LocalTransport`) are two transports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mist_fed.errors import ConfigError
from mist_fed.fleet import aggregation
from mist_fed.fleet.aggregation import Aggregator, AsyncAggregator, Update
from mist_fed.fleet.job import DROPPED, OK, DeviceJob, DeviceResult, StateDict, state_digest
from mist_fed.fleet.plan import FleetPlan
from mist_fed.fleet.scoring import (
    CentralResult,
    FleetClock,
    Scorer,
    central_epochs,
    fleet_row,
    mark_straggler,
    round_seconds,
)
from mist_fed.fleet.spec import FleetSpec
from mist_fed.fleet.state import DriverRandom, StateProvider, register_state_class, restore
from mist_fed.fleet.storage import RunStorage
from mist_fed.fleet.transport import Reply, RunStopped, Transport

log = logging.getLogger(__name__)

IDLE_S = 600.0  # simulated seconds a round lasts when no device of any fleet ran in it


@register_state_class
@dataclass
class RunRecords:
    """What a run produced: one dict per device per round, one per fleet per round."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    fleets: list[dict[str, Any]] = field(default_factory=list)
    final_states: dict[str, StateDict] = field(default_factory=dict)
    # time.perf_counter() stamps: "start" (the rounds are set up from here) and "end" (the last
    # round recorded), so a caller can tell its runtime's start-up apart
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def rounds_completed(self) -> int:
        return max((r["round"] for r in self.fleets), default=0)


@register_state_class
@dataclass
class RoundState:
    """Everything the rounds change: what a checkpoint after round ``round`` holds, with
    the engine's :attr:`SyncRounds.providers` (:mod:`mist_fed.fleet.state`)."""

    round: int = 0
    global_state: dict[str, StateDict] = field(default_factory=dict)  # fleet -> model
    device_state: dict[int, StateDict] = field(default_factory=dict)  # local fleets' devices
    clocks: dict[str, FleetClock] = field(default_factory=dict)
    sim_s: float = 0.0  # the run's virtual clock: when the next round starts (simulated s)
    central: dict[str, CentralResult] = field(default_factory=dict)
    records: RunRecords = field(default_factory=RunRecords)
    # asynchronous fleets' event state (fleet -> mist_fed.fleet.async_rounds.AsyncFleetState)
    asynchronous: dict[str, Any] = field(default_factory=dict)


def sample_seed(seed: int, rnd: int, fleet_index: int) -> int:
    """The seed of one fleet's sampling in round ``rnd`` (repeatable, distinct per fleet)."""
    return seed * 100_003 + rnd * 97 + fleet_index


@dataclass
class SyncRounds:
    """Rounds of sample -> send -> filter (failed, dropped, stragglers) -> aggregate -> score.

    ``storage``: the run's device storage (each job names its device's directory in it);
    ``stop``, once set, ends the run with :class:`RunStopped` between rounds and after a
    round's replies; ``on_result`` sees each result as it is decided, ``on_round`` the state
    after each round; ``aggregators``: each synchronous fleet's, by name, and
    ``async_aggregators`` each asynchronous fleet's (default: built from the spec).
    ``providers``: the state outside :class:`RoundState` a checkpoint saves, by name (each
    aggregator that has any, the driver's random generators).
    """

    plan: FleetPlan
    transport: Transport
    scorer: Scorer
    cloud: str
    storage: RunStorage
    stop: threading.Event | None = None
    on_result: Callable[[DeviceResult], None] | None = None
    on_round: Callable[[RoundState], None] | None = None
    aggregators: dict[str, Aggregator | None] = field(default_factory=dict)
    async_aggregators: dict[str, AsyncAggregator] = field(default_factory=dict)
    spec: FleetSpec = field(init=False)
    providers: dict[str, StateProvider] = field(init=False, default_factory=dict)
    sync_fleets: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.spec = self.plan.spec
        self.sync_fleets = []
        for f in self.spec.fleets:
            if f.name in self.async_aggregators:
                continue
            if f.name not in self.aggregators and aggregation.is_async(f.aggregation):
                self.async_aggregators[f.name] = aggregation.build_async(
                    f.aggregation, f.aggregation_args, f.devices
                )
                continue
            self.sync_fleets.append(f.name)
            if f.name not in self.aggregators:
                self.aggregators[f.name] = aggregation.build(
                    f.aggregation, f.aggregation_args, f.devices
                )
            agg = self.aggregators[f.name]
            if isinstance(agg, StateProvider):  # a Flower strategy's momentum, moments
                self.providers[f"aggregator/{f.name}"] = agg
        self.providers["random"] = DriverRandom()

    # -- state -------------------------------------------------------------------------------
    def start(self, records: RunRecords | None = None) -> RoundState:
        """Round 0: each fleet's initial model and its central reference; the rounds' rows
        will go into ``records`` (a new one when none is given)."""
        state = RoundState(records=RunRecords() if records is None else records)
        for f in self.spec.fleets:
            state.global_state[f.name] = self.scorer.initial_state(f, self.plan.num_classes(f.name))
            state.clocks[f.name] = FleetClock()
        done: dict[tuple[Any, ...], CentralResult] = {}  # one training per distinct reference
        for f in self.spec.fleets:
            if self.spec.central:
                state.central[f.name] = self._central(f.name, state.global_state[f.name], done)
        return state

    def resume(self, saved: dict[str, Any]) -> RoundState:
        """The state a checkpoint saved (:func:`mist_fed.fleet.state.snapshot` of a
        :class:`RoundState` and :attr:`providers`), every provider loaded back."""
        state = restore(saved, self.providers)
        if not isinstance(state, RoundState):
            raise ConfigError("the checkpoint holds no round state; it is not a fleet run's")
        return state

    def _central(
        self, name: str, initial: StateDict, done: dict[tuple[Any, ...], CentralResult]
    ) -> CentralResult:
        """Fleet ``name``'s central reference; one already in ``done`` with the same task,
        method, images, epochs and initial weights (fleets of one run on the same devices'
        data: FedAvg against FedAvgM) is the same training, so it is reused."""
        fleet = self.plan.fleet(name)
        # The union of the devices' images; where they share images, more epochs over it make
        # the same sample-steps as the fleet's (slots / distinct images as many).
        ids = self.plan.union(name)
        slots, distinct = self.plan.sharing(name)
        share = self.share(name) * slots / distinct
        epochs = central_epochs(self.spec, share, self.spec.rounds_of(name))
        images = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        key = (self.plan.data_task(name), fleet.method, epochs, state_digest(initial), images)
        if key in done:
            log.info("fleet %s: the central reference of a fleet with the same images", name)
            return done[key]
        log.info("fleet %s: central reference on %d images, %d epochs", name, len(ids), epochs)
        central = self.scorer.central(fleet, self.plan.num_classes(name), ids, initial, epochs)
        log.info("fleet %s: central accuracy %.4f", name, central.accuracy)
        done[key] = central
        return central

    def share(self, fleet: str) -> float:
        """The expected share of ``fleet``'s devices that train in a round."""
        f = self.plan.fleet(fleet)
        agg = self.async_aggregators.get(fleet) or self.aggregators[fleet]
        if agg is None or self.spec.per_round is not None:
            sampled = self.spec.per_round_of(f)
        else:
            sampled = agg.sampled(f.devices)
        return sampled / f.devices * (1.0 - self.plan.availability.drop_p)

    # -- one round ---------------------------------------------------------------------------
    @property
    def last_round(self) -> int:
        """The synchronous fleets' last round (0: none is synchronous)."""
        return max((self.spec.rounds_of(n) for n in self.sync_fleets), default=0)

    def active(self, rnd: int) -> list[str]:
        """The synchronous fleets that run round ``rnd`` (a fleet may have fewer rounds)."""
        return [n for n in self.sync_fleets if rnd <= self.spec.rounds_of(n)]

    def available(self, fleet: str, rnd: int, sim_s: float = 0.0) -> list[int]:
        """``fleet``'s devices that can be sampled in round ``rnd``, which starts at simulated
        second ``sim_s``: those its availability model has online then (a sampled device may
        still drop out)."""
        devices = np.asarray(self.plan.devices_of(fleet))
        return devices[self.plan.availability.online(devices, sim_s)].tolist()

    def sample(
        self, fleet: str, rnd: int, current: StateDict, sim_s: float = 0.0
    ) -> tuple[list[DeviceJob], dict[str, Any]]:
        """The devices ``fleet``'s aggregator picks for round ``rnd`` (its global model:
        ``current``; the round starts at ``sim_s``), as jobs made now, and its config."""
        members = self.available(fleet, rnd, sim_s)
        agg = self.aggregators[fleet]
        index = [f.name for f in self.spec.fleets].index(fleet)
        seed = sample_seed(self.spec.seed, rnd, index)
        wanted = self.spec.per_round
        if agg is None:  # local: the available devices (per_round of them) train their own
            if wanted is not None and len(members) > wanted:
                pick = np.random.default_rng([seed, 31]).choice(len(members), wanted, False)
                members = [members[i] for i in pick]
            chosen, config = members, dict[str, Any]()
        else:
            chosen, config = agg.sample(rnd, current, members, seed, wanted)
        return [self.plan.job(i) for i in sorted(chosen)], config

    def _model_for(self, state: RoundState, d: DeviceJob) -> StateDict:
        if self.aggregators[d.fleet] is None and d.device in state.device_state:
            return state.device_state[d.device]
        return state.global_state[d.fleet]

    def _job(self, d: DeviceJob, rnd: int, config: dict[str, Any]) -> DeviceJob:
        s = self.spec
        return d.for_round(
            rnd,
            self.cloud,
            self.storage.location(d.fleet, d.device),
            lr=s.lr * s.lr_decay ** (rnd - 1),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )

    def _advance(self, state: RoundState, results: dict[int, Reply]) -> float:
        """The run's clock after this round: its slowest fleet's round time (fleets run side
        by side), or :data:`IDLE_S` when no device ran (nothing was available)."""
        by_fleet: dict[str, list[DeviceResult]] = {}
        for dev, (res, _) in results.items():
            by_fleet.setdefault(self.plan.fleet_of(dev), []).append(res)
        times = [round_seconds(rs, self.spec) for rs in by_fleet.values()]
        ran = any(r.status != DROPPED for rs in by_fleet.values() for r in rs)
        return state.sim_s + (max(times, default=0.0) if ran else IDLE_S)

    def round(self, state: RoundState) -> None:
        """Run round ``state.round + 1``; ``state`` holds its outcome."""
        rnd = state.round + 1
        log.info("round %d of %d", rnd, self.last_round)
        picked: list[tuple[DeviceJob, dict[str, Any]]] = []
        for name in self.active(rnd):
            chosen, config = self.sample(name, rnd, state.global_state[name], state.sim_s)
            picked += [(d, config) for d in chosen]
        jobs = {d.device: d for d, _ in picked}
        # sent nothing: the availability model's dropouts, and devices whose share is empty
        # (a partitioner may leave some of a large population without images)
        gone = {
            d: "dropout" for d in self.plan.availability.dropped(list(jobs), rnd, self.spec.seed)
        }
        gone.update(
            {d: "empty share: no training images" for d, j in jobs.items() if not j.train_ids}
        )
        active = [
            (self._job(d, rnd, c), self._model_for(state, d))
            for d, c in picked
            if d.device not in gone
        ]
        digests = {id(m): state_digest(m) for _, m in active}  # a few distinct models
        received = {j.device: digests[id(m)] for j, m in active}
        results: dict[int, Reply] = {}
        if active:
            self.transport.submit(active)
            del active
            for res, st in self.transport.replies():
                if mark_straggler(res, self.spec.deadline_s):
                    st = None
                results[res.device] = (res, st)
                if self.on_result:
                    self.on_result(res)
        self.check_stop()  # replies to a run being stopped do not make a completed round
        for dev in sorted(gone):
            results[dev] = (DeviceResult(dev, rnd, DROPPED, gone[dev]), None)
            if self.on_result:
                self.on_result(results[dev][0])
        scores = self._aggregate_and_score(rnd, state, results)
        now = self._advance(state, results)
        rows = []
        for dev in sorted(results):
            d, res = jobs[dev], results[dev][0]
            fleet = self.plan.fleet(d.fleet)
            rows.append({
                "round": rnd, "device": dev, "fleet": d.fleet, "task": d.task,
                "method": d.method, "aggregation": fleet.aggregation, "profile": d.profile,
                **{k: v for k, v in res.row().items() if k not in ("device", "round")},
                "received_digest": received.get(dev, ""),
            })  # fmt: skip
        fleet_rows = []
        for f in map(self.plan.fleet, self.active(rnd)):
            rs = [results[d][0] for d in sorted(results) if jobs[d].fleet == f.name]
            row = fleet_row(self.plan, f, rnd, rs, scores.get(f.name), state.clocks[f.name],
                            state.central.get(f.name), now)  # fmt: skip
            fleet_rows.append(dataclasses.asdict(row))
        # A round's rows land together, so a run stopped mid-round leaves whole rounds.
        state.records.devices.extend(rows)
        state.records.fleets.extend(fleet_rows)
        state.round = rnd
        state.sim_s = now

    def _aggregate_and_score(
        self, rnd: int, state: RoundState, results: dict[int, Reply]
    ) -> dict[str, float]:
        """Aggregate each federated fleet and score its global model on the server."""
        scores: dict[str, float] = {}
        fleet_of = {dev: self.plan.fleet_of(dev) for dev in results}
        for f in map(self.plan.fleet, self.active(rnd)):
            done = [
                Update(dev, st, res.num_examples)
                for dev, (res, st) in sorted(results.items())
                if fleet_of[dev] == f.name and res.status == OK and st is not None
            ]
            agg = self.aggregators[f.name]
            if agg is None:
                for u in done:
                    state.device_state[u.device] = u.state
                continue
            for u in done:  # the models live on in ``done`` only, until aggregated
                results[u.device] = (results[u.device][0], None)
            new = agg.aggregate(rnd, state.global_state[f.name], done) if done else None
            if new is None:
                log.warning("round %d: fleet %s has no new model; weights kept", rnd, f.name)
            else:
                state.global_state[f.name] = new
            scores[f.name] = self.scorer.evaluate(
                f, self.plan.num_classes(f.name), state.global_state[f.name]
            )
        return scores

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RunStopped("the fleet run was stopped")

    # -- the run -----------------------------------------------------------------------------
    def run(self, state: RoundState | None = None) -> RunRecords:
        """Every round of the synchronous fleets after ``state``'s (from round 0 when none is
        given); nothing when every fleet is asynchronous."""
        if state is None:
            state = self.start()
        while state.round < self.last_round:
            self.check_stop()
            self.round(state)
            if self.on_round:
                self.on_round(state)
        rec = state.records
        rec.final_states = dict(state.global_state)
        for dev, st in state.device_state.items():
            rec.final_states[f"device-{dev}"] = st
        return rec
