"""The server's side of a fleet: initial weights, the global model's score, the centralized
reference, stragglers, the virtual clock and each round's fleet row.

The server works through an :class:`~mist_fed.device.edge.EdgeDevice` like every device (the
same fetch, on-device cache, net construction, trainer and evaluation; a ``_server`` storage
directory of the run, a laptop profile whose clock and memory cap are not charged to any
device):

* :meth:`Scorer.initial_state`: a fleet's seeded initial edge net, built by the device's
  :meth:`~mist_fed.device.edge.EdgeDevice.new_net` (sized from the cloud's geometry and the
  wire; Partial-1's pretrained block through its ``edge_init``).
* :meth:`Scorer.evaluate`: a fleet's global model on the task's evaluation images
  (:attr:`FleetPlan.eval_ids <mist_fed.fleet.plan.FleetPlan>`; server-side evaluation, as
  Flower's strategies do with an evaluate function). Every round of every fleet of a task is
  scored on the same images, and so is the central reference: their difference is paired.
* :meth:`Scorer.central`: the fleet's edge net trained centrally, from the fleet's initial
  weights, on the union of its devices' training images, for the sample-steps the fleet's
  schedule trains (rounds x local epochs x the share of devices a round trains), with the
  devices' batch size and learning rate; then scored on the same evaluation images.

A round's simulated time is its slowest participating device's transfer + compute (FedScale's
virtual clock), capped by the deadline; a device past the deadline is a straggler. Fleets run
their rounds side by side: the run's clock (:attr:`~mist_fed.fleet.rounds.RoundState.sim_s`)
moves by the slowest fleet's round, and every fleet's row reads it (``sim_time_s``). An
asynchronous fleet's clock is its event time instead: a server step happens when the update
that fills its buffer finishes (``FleetClock.advance(..., step=True)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import detect_host_memory_mb, load_profile
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.fleet.job import DROPPED, FAILED, OK, STRAGGLER, DeviceResult, StateDict
from mist_fed.fleet.plan import FleetPlan
from mist_fed.fleet.spec import FleetSpec, TaskFleet
from mist_fed.fleet.state import register_state_class
from mist_fed.fleet.worker import SourceFactory, close_source
from mist_fed.report.results import FleetRow

SERVER_PROFILE = "laptop"


@register_state_class
@dataclass(frozen=True)
class CentralResult:
    accuracy: float
    sample_steps: int  # rows x epochs the trainer saw
    epochs: int
    images: int  # the union of the fleet's training images (labelled)
    host_s: float


def central_epochs(spec: FleetSpec, share: float, rounds: int) -> int:
    """Epochs over the union that match the fleet's sample-steps: ``rounds x local_epochs``
    scaled by the share of devices a round (or server step) trains, at least 1."""
    return max(1, round(rounds * spec.local_epochs * share))


def central_config(spec: FleetSpec, method: str, epochs: int) -> TrainConfig:
    """The central reference's training: ``epochs`` at the devices' batch size and lr, or
    (``central_recipe = "comparison"``) at the comparison's (the trainer's defaults)."""
    if spec.central_recipe == "comparison":
        return TrainConfig.for_method(method, epochs=epochs, seed=spec.seed)
    return TrainConfig.for_method(
        method, epochs=epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed
    )


class Scorer:
    """The server's device: initial weights, evaluation and the central reference of a run."""

    def __init__(
        self,
        plan: FleetPlan,
        cloud: str,
        storage: str | Path,
        source: SourceFactory = FlightSource,
        progress: bool = False,
    ) -> None:
        """``progress``: bars on stderr for the server's downloads and the central training."""
        self.plan = plan
        self.spec = plan.spec
        self.progress = progress
        self.cloud = cloud
        self.storage = Path(storage)
        self.source = source

    def eval_ids(self, task: str) -> tuple[str, ...]:
        return self.plan.eval_ids[task]

    def _device(self, src: FeatureSource) -> EdgeDevice:
        # The server is not a simulated device: on a host with less memory available than a
        # laptop's (a shared host), it takes what there is rather than failing the run.
        profile = load_profile(SERVER_PROFILE)
        memory_mb = min(profile.memory_mb, detect_host_memory_mb())
        return EdgeDevice(
            dataclasses.replace(profile, memory_mb=memory_mb),
            src,
            self.storage,
            counts_runtime=False,
            progress=self.progress,
        )

    def initial_state(self, fleet: TaskFleet, num_classes: int) -> StateDict:
        """``fleet``'s seeded initial model: its devices start equal, federated or local."""
        s = self.spec
        src = self.source(self.cloud)
        try:
            with self._device(src) as device, torch.random.fork_rng(devices=[]):
                torch.manual_seed(s.seed)
                net = device.new_net(fleet.method, num_classes, s.k, wire=s.wire_dtype)
                return {k: v.detach().clone() for k, v in net.state_dict().items()}
        finally:
            close_source(src)

    def evaluate(self, fleet: TaskFleet, num_classes: int, state: StateDict) -> float:
        """Accuracy of ``state`` (the fleet's global model) on the fleet's evaluation images."""
        src = self.source(self.cloud)
        try:
            with self._device(src) as device:
                net = device.new_net(
                    fleet.method, num_classes, self.spec.k, state=state, wire=self.spec.wire_dtype
                )
                return self._score(device, fleet, net)
        finally:
            close_source(src)

    def _score(self, device: EdgeDevice, fleet: TaskFleet, net: torch.nn.Module) -> float:
        s = self.spec
        task = self.plan.data_task(fleet.name)
        test = device.features(
            task, "test", fleet.method, s.k, s.wire_dtype, ids=self.eval_ids(fleet.task)
        )
        return device.evaluate(net, test)

    def central(
        self,
        fleet: TaskFleet,
        num_classes: int,
        train_ids: Sequence[str],
        state: StateDict,
        epochs: int,
    ) -> CentralResult:
        """Train ``fleet``'s net from ``state`` on ``train_ids`` for ``epochs``; score it."""
        s = self.spec
        src = self.source(self.cloud)
        try:
            with self._device(src) as device:
                train = device.features(
                    self.plan.data_task(fleet.name),
                    "train",
                    fleet.method,
                    s.k,
                    s.wire_dtype,
                    ids=tuple(train_ids),
                )
                net = device.new_net(fleet.method, num_classes, s.k, state=state, wire=s.wire_dtype)
                cfg = central_config(s, fleet.method, epochs)
                fitted = device.train(net, train, cfg)
                acc = self._score(device, fleet, net)
                return CentralResult(
                    accuracy=acc,
                    sample_steps=fitted.samples,
                    epochs=epochs,
                    images=train.labelled,
                    host_s=fitted.seconds,
                )
        finally:
            close_source(src)


def mark_straggler(res: DeviceResult, deadline_s: float | None) -> bool:
    """Make an ``ok`` result past the round's deadline a straggler; whether it was one."""
    if res.status != OK or deadline_s is None or res.device_s <= deadline_s:
        return False
    res.status = STRAGGLER
    res.reason = f"deadline: {res.device_s:.1f} s > {deadline_s} s"
    return True


def round_seconds(results: Sequence[DeviceResult], spec: FleetSpec) -> float:
    """A fleet's round in simulated seconds: its slowest device that ran, capped by the
    deadline."""
    round_s = max((r.device_s for r in results if r.status != DROPPED), default=0.0)
    return round_s if spec.deadline_s is None else min(round_s, spec.deadline_s)


@register_state_class
@dataclass
class FleetClock:
    """One fleet's account across rounds: the run's simulated seconds at its last round,
    device-hours, sample-steps."""

    sim_s: float = 0.0
    device_hours: float = 0.0
    sample_steps: int = 0

    def advance(
        self, results: Sequence[DeviceResult], spec: FleetSpec, now: float, step: bool = False
    ) -> float:
        """Charge ``results``, which end at the run's simulated second ``now``: one round (the
        fleet's own round seconds returned) or, ``step``, an asynchronous fleet's server step
        (the seconds since its last one)."""
        times = [r.device_s for r in results if r.status != DROPPED]
        moved = now - self.sim_s if step else round_seconds(results, spec)
        self.sim_s = now
        self.device_hours += sum(times) / 3600.0
        self.sample_steps += sum(
            spec.local_epochs * r.num_examples for r in results if r.status == OK
        )
        return moved


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def fleet_row(
    plan: FleetPlan,
    fleet: TaskFleet,
    rnd: int,
    results: Sequence[DeviceResult],
    score: float | None,
    clock: FleetClock,
    central: CentralResult | None,
    now: float,
    step: bool = False,
) -> FleetRow:
    """One fleet's row of ``fleets.parquet`` for round ``rnd`` (``clock`` advances by it; the
    run's clock ends the round at ``now``; ``step``: an asynchronous fleet's server step at its
    event time ``now``).

    ``score``: the global model's accuracy on the server; ``None`` for a local fleet, whose
    accuracy is each device's own model on its own test images."""
    spec = plan.spec
    ok = [r for r in results if r.status == OK]
    if score is None:  # every device of a fleet has as many test images
        w = plan.test_size(fleet.name) * len(ok)
        acc = _mean([r.accuracy for r in ok]) if ok else math.nan
        eval_images = w
    else:
        acc, eval_images = score, len(plan.eval_ids[fleet.task])
    hours = clock.device_hours
    round_s = clock.advance(results, spec, now, step)
    slots, distinct = plan.sharing(fleet.name)
    ms = [r.metrics for r in results]
    images = sum(m.images_down for m in ms)
    feature_bytes = sum(m.feature_bytes for m in ms)
    return FleetRow(
        round=rnd,
        fleet=fleet.name,
        task=fleet.task,
        method=fleet.method,
        aggregation=fleet.aggregation,
        devices=fleet.devices,
        sampled=len(results),
        ok=len(ok),
        failed=sum(r.status == FAILED for r in results),
        dropped=sum(r.status == DROPPED for r in results),
        stragglers=sum(r.status == STRAGGLER for r in results),
        accuracy=acc,
        central_accuracy=central.accuracy if central else math.nan,
        eval_images=eval_images,
        sample_steps=clock.sample_steps,
        central_sample_steps=central.sample_steps if central else 0,
        round_time_s=round_s,
        sim_time_s=clock.sim_s,
        device_hours=clock.device_hours - hours,
        sim_device_hours=clock.device_hours,
        bytes_down=sum(m.bytes_down for m in ms),
        bytes_up=sum(m.bytes_up for m in ms),
        bytes_per_image=feature_bytes / images if images else math.nan,
        transfer_s=_mean([r.metrics.transfer_s for r in ok]),
        compute_s=_mean([r.metrics.compute_s for r in ok]),
        peak_mem_mb=max((m.peak_mem_mb for m in ms), default=math.nan),
        train_slots=slots,
        train_images=distinct,
        mean_device_accuracy=_mean([r.accuracy for r in ok]),
        feature_bytes=feature_bytes,
        images_down=images,
    )
