"""The event-driven loop of asynchronous fleets (FedBuff, FedAsync) on the virtual clock.

:class:`AsyncRounds` sits beside :class:`~mist_fed.fleet.rounds.SyncRounds` and uses its
parts: the same :class:`~mist_fed.fleet.transport.Transport`, scorer, plan, availability hook
(:meth:`SyncRounds.available <mist_fed.fleet.rounds.SyncRounds.available>`) and
:class:`~mist_fed.fleet.rounds.RoundState`; an asynchronous fleet's event state is an
:class:`AsyncFleetState` in ``RoundState.asynchronous`` (plain data, picklable).

Simulated time, per fleet:

* A device starts a job at simulated second ``t`` from the global model current at ``t``
  (version ``v``: server steps so far). It finishes at ``t + transfer + compute``: the device
  seconds its reply reports, from its profile (:mod:`mist_fed.device.clock`), as the
  synchronous clock charges them.
* Up to ``max_concurrency`` devices train at once; whenever a job ends, its slot goes at that
  simulated second to an idle available device, drawn by the fleet's seeded generator.
* The server consumes replies in simulated order (finish time, then device number), whatever
  order the transport returns them in: a reply waits in :attr:`AsyncFleetState.finished`
  until no job still outstanding could finish before it. Outstanding jobs started no later
  than the current event and their durations are unknown until they reply, so the next event
  is consumed once every outstanding job has replied: the run is exact and repeatable, and
  its jobs run in parallel (in real time) only as far as they start at one simulated second.
* Devices are those the fleet's availability model has online at the event's simulated second
  (:meth:`SyncRounds.available <mist_fed.fleet.rounds.SyncRounds.available>`); a device's job
  is made when it is picked (:meth:`~mist_fed.fleet.plan.FleetPlan.job`).
* A checkpoint after each server step holds the fleet's event state. No job is in flight then
  (an event is consumed only once every outstanding job has replied, and the slots it frees
  are filled after the step): the replies still waiting for their simulated turn are in the
  checkpoint, so a resumed fleet goes on exactly as the uninterrupted one.
* A consumed update has staleness ``s = steps now - v``; ``max_staleness`` drops it (a
  ``straggler`` row, never buffered); else it joins the buffer with the model it trained from.
  Once the buffer holds ``buffer_size`` updates, the aggregator's server step makes the next
  model, the server scores it, and the step is a row of ``fleets.parquet`` (``round`` = the
  step, ``sim_time_s`` = its simulated second, the staleness of its updates).
* Each consumed job is a row of ``devices.parquet`` (``round``: the step it feeds; with its
  ``staleness``, ``sim_start_s`` and ``sim_end_s``). Jobs still in flight when the last step
  is made are not consumed, and not charged.

A fleet's ``rounds`` counts its server steps. No Flower, no Ray.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mist_fed.errors import MistError
from mist_fed.fleet.aggregation import AsyncAggregator, Update
from mist_fed.fleet.job import OK, STRAGGLER, DeviceJob, DeviceResult, StateDict, state_digest
from mist_fed.fleet.rounds import IDLE_S, RoundState, SyncRounds
from mist_fed.fleet.scoring import fleet_row
from mist_fed.fleet.state import register_state_class
from mist_fed.fleet.transport import Reply

log = logging.getLogger(__name__)

IDLE_STEPS = 2016  # waits of IDLE_S with no device online before a fleet gives up (14 days)


@register_state_class
@dataclass
class Flight:
    """A job the transport has, not yet replied: where and from which model it started."""

    job: DeviceJob
    start_s: float
    version: int
    digest: str  # of the model it was sent


@register_state_class
@dataclass
class Finished:
    """A reply waiting for its simulated turn."""

    flight: Flight
    result: DeviceResult
    state: StateDict | None

    @property
    def end_s(self) -> float:
        return self.flight.start_s + self.result.device_s

    @property
    def key(self) -> tuple[float, int]:
        return self.end_s, self.result.device


@register_state_class
@dataclass
class AsyncFleetState:
    """Everything one asynchronous fleet's events change (a checkpoint holds it as it is)."""

    rng: np.random.Generator
    step: int = 0  # server steps made: the current model's version
    now_s: float = 0.0  # the simulated second of the last event
    jobs: int = 0  # jobs started (each job's number, its seed's round)
    in_flight: dict[int, Flight] = field(default_factory=dict)  # device -> its job
    finished: list[Finished] = field(default_factory=list)
    buffer: list[Update] = field(default_factory=list)
    models: dict[int, StateDict] = field(default_factory=dict)  # versions jobs started from
    rows: list[dict[str, Any]] = field(default_factory=list)  # device rows of the next step
    consumed: list[DeviceResult] = field(default_factory=list)  # results of the next step
    staleness: list[int] = field(default_factory=list)  # of the next step's consumed updates

    def next_event(self) -> Finished | None:
        """The earliest waiting reply once no outstanding job can finish before it."""
        if not self.finished:
            return None
        first = min(self.finished, key=lambda f: f.key)
        # an outstanding job ends at or after its start, its duration unknown until it replies
        if any(f.start_s <= first.end_s for f in self.in_flight.values()):
            return None
        return first


@dataclass
class AsyncRounds:
    """The asynchronous fleets of ``rounds``' plan, one after another, each for
    its ``rounds`` server steps (see the module docstring). ``on_step`` sees the state
    after every server step (the run session writes its tables there)."""

    rounds: SyncRounds
    on_step: Callable[[RoundState], None] | None = None
    _replies: Iterator[Reply] | None = field(default=None, init=False, repr=False)

    @property
    def fleets(self) -> list[str]:
        return [f.name for f in self.rounds.spec.fleets if f.name in self.rounds.async_aggregators]

    def run(self, state: RoundState) -> None:
        """Every asynchronous fleet's server steps after ``state``'s."""
        for name in self.fleets:
            self.run_fleet(state, name)
            state.records.final_states[name] = state.global_state[name]

    # -- one fleet ---------------------------------------------------------------------------
    def run_fleet(self, state: RoundState, name: str) -> None:
        r = self.rounds
        index = [f.name for f in r.spec.fleets].index(name)
        fs = state.asynchronous.get(name)
        if fs is None:
            fs = AsyncFleetState(rng=np.random.default_rng([r.spec.seed, 7919, index]))
            fs.models[0] = state.global_state[name]
            state.asynchronous[name] = fs
        agg = r.async_aggregators[name]
        steps = r.spec.rounds_of(name)
        if fs.step >= steps:
            return  # done before the run was resumed
        log.info("fleet %s: %d asynchronous server steps", name, steps)
        try:
            self._fill(state, fs, name, agg)
            while fs.step < steps:
                r.check_stop()
                event = fs.next_event()
                if event is None:
                    self._receive(fs, name)
                    continue
                self._consume(state, fs, name, agg, event)
                if fs.step < steps:
                    self._fill(state, fs, name, agg)
        finally:
            if isinstance(self._replies, Generator):
                self._replies.close()  # the transport lets go of jobs still in flight
            self._replies = None
        fs.in_flight.clear()
        fs.finished.clear()
        fs.models = {fs.step: state.global_state[name]}

    def _fill(
        self, state: RoundState, fs: AsyncFleetState, name: str, agg: AsyncAggregator
    ) -> None:
        """Start jobs at ``fs.now_s`` on idle available devices, up to the concurrency cap;
        while none is online and none is training, simulated time moves on by
        :data:`~mist_fed.fleet.rounds.IDLE_S` (as an empty synchronous round does)."""
        for _ in range(IDLE_STEPS):
            if self._start(state, fs, name, agg) or fs.in_flight or fs.finished:
                return
            fs.now_s += IDLE_S
        raise MistError(
            f"fleet {name}: no device was available for {IDLE_STEPS * IDLE_S / 86400:.0f} "
            f"simulated days at server step {fs.step + 1}; check the fleet's availability model"
        )

    def _start(
        self, state: RoundState, fs: AsyncFleetState, name: str, agg: AsyncAggregator
    ) -> int:
        """The jobs started now (see :meth:`_fill`)."""
        r = self.rounds
        members = r.available(name, fs.step + 1, fs.now_s)
        population = len(r.plan.devices_of(name))
        cap = min(agg.max_concurrency or population, population)
        # busy in simulated time: jobs outstanding, and those replied but not yet over
        busy = set(fs.in_flight) | {f.result.device for f in fs.finished}
        idle = [d for d in members if d not in busy]
        free = cap - len(busy)
        if free <= 0 or not idle:
            return 0
        picks = fs.rng.choice(len(idle), size=min(free, len(idle)), replace=False)
        model = state.global_state[name]
        fs.models.setdefault(fs.step, model)
        digest = state_digest(model)
        s, jobs = r.spec, []
        for i in sorted(int(p) for p in picks):
            d = r.plan.job(idle[i])  # made when sampled (a population holds no jobs)
            if not d.train_ids:
                continue  # an empty share (a partitioner may leave a device none)
            fs.jobs += 1
            job = d.for_round(
                fs.jobs, r.cloud, r.storage.location(d.fleet, d.device),
                lr=s.lr * s.lr_decay**fs.step, proximal_mu=0.0,
            )  # fmt: skip
            fs.in_flight[d.device] = Flight(job, fs.now_s, fs.step, digest)
            jobs.append((job, model))
        if jobs:
            r.transport.submit(jobs)
        return len(jobs)

    def _receive(self, fs: AsyncFleetState, name: str) -> None:
        """One reply from the transport, in whatever order it comes, kept for its turn."""
        reply = self._next_reply(len(fs.in_flight))
        res, st = reply
        flight = fs.in_flight.pop(res.device, None)
        if flight is None or flight.job.round != res.round:
            raise MistError(f"fleet {name}: a reply for device {res.device} that was not sent")
        fs.finished.append(Finished(flight, res, st if res.status == OK else None))

    def _next_reply(self, waiting: int) -> Reply:
        for _ in range(2):  # a transport's replies end when none is in flight: open them again
            if self._replies is None:
                self._replies = iter(self.rounds.transport.replies())
            try:
                return next(self._replies)
            except StopIteration:
                self._replies = None
        raise MistError(f"the transport ended with {waiting} device job(s) unanswered")

    def _consume(
        self,
        state: RoundState,
        fs: AsyncFleetState,
        name: str,
        agg: AsyncAggregator,
        event: Finished,
    ) -> None:
        """The server takes ``event`` at its simulated second; a full buffer makes a step."""
        r = self.rounds
        fs.finished.remove(event)
        fs.now_s = event.end_s
        res, flight = event.result, event.flight
        staleness = fs.step - flight.version
        if res.status == OK and event.state is not None:
            if agg.max_staleness is not None and staleness > agg.max_staleness:
                res.status = STRAGGLER
                res.reason = f"staleness {staleness} > max_staleness {agg.max_staleness}"
            else:
                base = fs.models[flight.version]
                fs.buffer.append(Update(res.device, event.state, res.num_examples, staleness, base))
                fs.staleness.append(staleness)
        self._release(fs)
        if r.on_result:
            r.on_result(res)
        fs.consumed.append(res)
        d = flight.job
        fs.rows.append({
            "round": fs.step + 1, "device": d.device, "fleet": d.fleet, "task": d.task,
            "method": d.method, "aggregation": r.plan.fleet(name).aggregation,
            "profile": d.profile,
            **{k: v for k, v in res.row().items() if k not in ("device", "round")},
            "received_digest": flight.digest, "staleness": staleness,
            "sim_start_s": flight.start_s, "sim_end_s": fs.now_s, "job": d.round,
        })  # fmt: skip
        if len(fs.buffer) >= agg.buffer_size:
            self._server_step(state, fs, name, agg)

    def _release(self, fs: AsyncFleetState) -> None:
        """Let go of models no outstanding job started from (buffered updates hold theirs)."""
        used = {f.version for f in fs.in_flight.values()}
        used |= {f.flight.version for f in fs.finished}
        for v in [v for v in fs.models if v not in used and v != fs.step]:
            del fs.models[v]

    def _server_step(
        self, state: RoundState, fs: AsyncFleetState, name: str, agg: AsyncAggregator
    ) -> None:
        r = self.rounds
        fleet = r.plan.fleet(name)
        updates, fs.buffer = fs.buffer, []
        state.global_state[name] = agg.step(state.global_state[name], updates)
        del updates
        fs.step += 1
        fs.models[fs.step] = state.global_state[name]
        score = r.scorer.evaluate(fleet, r.plan.num_classes(name), state.global_state[name])
        row = fleet_row(
            r.plan, fleet, fs.step, fs.consumed, score, state.clocks[name],
            state.central.get(name), fs.now_s, step=True,
        )  # fmt: skip
        if fs.staleness:
            row.staleness_mean = float(np.mean(fs.staleness))
            row.staleness_max = float(max(fs.staleness))
        log.info(
            "fleet %s: step %d at %.0f simulated s, accuracy %.4f", name, fs.step, fs.now_s, score
        )
        # A step's rows land together, so a run stopped mid-step leaves whole steps.
        state.records.devices.extend(fs.rows)
        state.records.fleets.append(dataclasses.asdict(row))
        fs.rows, fs.consumed, fs.staleness = [], [], []
        self._release(fs)
        if self.on_step:
            self.on_step(state)
