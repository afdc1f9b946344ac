"""The server's side of a fleet: the global model's score, and the centralized reference.

Both run in the driver through an :class:`~mist_fed.device.edge.EdgeDevice` (the same fetch,
on-device cache, trainer and evaluation as every device; a ``server`` storage directory of the
run, a laptop profile whose clock and memory cap are not charged to any device):

* :meth:`Reference.evaluate`: a fleet's global model on the fleet's evaluation images, the
  first ``eval_images`` of a seeded permutation of the task's test split (server-side
  evaluation, as Flower's strategies do with an evaluate function). Every round of every fleet
  of a task is scored on the same images, and so is the central reference: their difference
  is a paired figure.
* :meth:`Reference.central`: the fleet's edge net trained centrally, from the fleet's initial
  weights, on the union of its devices' training images, for the sample-steps the fleet's
  schedule trains (rounds x local epochs x the share of devices a round trains), with the
  devices' batch size and learning rate; then scored on the same evaluation images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mist_fed.data import get_task
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.fleet.device import SourceFactory, StateDict, close_source
from mist_fed.fleet.partition import sample_pool
from mist_fed.fleet.spec import FleetSpec, TaskFleet

SERVER_PROFILE = "laptop"


@dataclass(frozen=True)
class CentralResult:
    accuracy: float
    sample_steps: int  # rows x epochs the trainer saw
    epochs: int
    images: int  # the union of the fleet's training images (labelled)
    host_s: float


def eval_ids(task: str, n: int, seed: int) -> tuple[str, ...]:
    """The first ``n`` of the seeded permutation of ``task``'s test split (all when smaller)
    that the devices' test shares are drawn from: those are among them, embedded once."""
    test = get_task(task).split("test")
    ids = list(test.ids)
    return tuple(ids[i] for i in sample_pool(len(test), min(n, len(test)), seed + 1))


def central_epochs(spec: FleetSpec, share: float) -> int:
    """Epochs over the union that match the fleet's sample-steps: ``rounds x local_epochs``
    scaled by the share of devices a round trains (sampling and dropout), at least 1."""
    return max(1, round(spec.rounds * spec.local_epochs * share))


class Reference:
    """Server-side evaluation and the central reference of every fleet of one run."""

    def __init__(
        self,
        spec: FleetSpec,
        cloud: str,
        storage: str | Path,
        source: SourceFactory = FlightSource,
        progress: bool = False,
    ) -> None:
        """``progress``: bars on stderr for the server's downloads and the central training."""
        self.spec = spec
        self.progress = progress
        self.cloud = cloud
        self.storage = Path(storage)
        self.source = source
        self._eval_ids: dict[str, tuple[str, ...]] = {}

    def eval_ids(self, task: str) -> tuple[str, ...]:
        if task not in self._eval_ids:
            self._eval_ids[task] = eval_ids(task, self.spec.eval_images, self.spec.seed)
        return self._eval_ids[task]

    def _device(self, src: FeatureSource) -> EdgeDevice:
        return EdgeDevice(
            load_profile(SERVER_PROFILE),
            src,
            self.storage,
            counts_runtime=False,
            progress=self.progress,
        )

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
        test = device.features(
            fleet.task, "test", fleet.method, s.k, s.wire_dtype, ids=self.eval_ids(fleet.task)
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
                    fleet.task, "train", fleet.method, s.k, s.wire_dtype, ids=tuple(train_ids)
                )
                net = device.new_net(fleet.method, num_classes, s.k, state=state, wire=s.wire_dtype)
                cfg = TrainConfig.for_method(
                    fleet.method, epochs=epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed
                )
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
