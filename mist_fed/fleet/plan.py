"""A fleet spec made concrete, lazily: each device's fleet, profile and share of the task's
images, resolved when the device is asked for (when it is first sampled), never held.

:func:`plan_fleet` reads the tasks' splits (ids and labels, never images) and builds, per
fleet, its :class:`~mist_fed.fleet.partition.Shares` (the spec's partitioner over the
fleet's pool of the training split of the spec's protocol). Device numbers run across the
fleets (fleet 0's devices first); :meth:`FleetPlan.job` makes a device's round-0
:class:`DeviceJob` when called, so a population of 100,000 devices costs the plan its index
tables (ids, labels, the partitioner's), not an object per device.

The server's evaluation images of a task are the first ``eval_images`` of a seeded order of its
test split; a device's test share is ``test_per_device`` consecutive images of that pool from
its own offset (wrapping: shared by devices when the pool is smaller than the fleet's need), so
the cloud embeds them once and every score of a task (each round's global model, the central
reference) is paired.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mist_fed.data import get_task
from mist_fed.fleet.availability import Availability, parse
from mist_fed.fleet.job import DeviceJob
from mist_fed.fleet.partition import Shares, pool_indices, shares
from mist_fed.fleet.spec import FleetSpec, TaskFleet, assign_profiles

log = logging.getLogger(__name__)


@dataclass
class FleetData:
    """One fleet's devices (``first`` .. ``first + count - 1``), ids and shares."""

    fleet: TaskFleet
    first: int
    count: int
    data_task: str  # the task spec devices ask the cloud for (its protocol in it)
    num_classes: int
    train_ids: list[str]
    test_ids: list[str]
    eval_pool: list[int]  # rows of the test split: the server's evaluation images
    shares: Shares

    def __contains__(self, device: int) -> bool:
        return self.first <= device < self.first + self.count


@dataclass
class FleetPlan:
    """Every device of the run, on demand, and the evaluation images."""

    spec: FleetSpec
    fleets: dict[str, FleetData]
    eval_ids: dict[str, tuple[str, ...]]  # task -> the server's evaluation images
    availability: Availability
    profiles: np.ndarray  # device -> index into spec.profiles (one byte a device)
    _names: list[str] = field(default_factory=list)

    def fleet(self, name: str) -> TaskFleet:
        return self.fleets[name].fleet

    @property
    def population(self) -> int:
        return self.spec.num_devices

    def devices_of(self, fleet: str) -> range:
        """``fleet``'s device numbers."""
        d = self.fleets[fleet]
        return range(d.first, d.first + d.count)

    def fleet_of(self, device: int) -> str:
        return next(name for name, d in self.fleets.items() if device in d)

    def num_classes(self, fleet: str) -> int:
        return self.fleets[fleet].num_classes

    def data_task(self, fleet: str) -> str:
        return self.fleets[fleet].data_task

    def test_size(self, fleet: str) -> int:
        """Test images each device of ``fleet`` evaluates on."""
        return min(self.spec.test_per_device, len(self.fleets[fleet].eval_pool))

    def job(self, device: int) -> DeviceJob:
        """Device ``device``'s round-0 job: its share resolved now (nothing kept)."""
        name = self.fleet_of(device)
        d, s = self.fleets[name], self.spec
        local = device - d.first
        rows = d.shares.indices(local)
        per = self.test_size(name)
        pool = d.eval_pool
        tests = [pool[(local * per + j) % len(pool)] for j in range(per)]
        return DeviceJob(
            device=device,
            fleet=name,
            task=d.data_task,
            method=d.fleet.method,
            profile=s.profiles[int(self.profiles[device])][0],
            train_ids=tuple(d.train_ids[i] for i in rows),
            test_ids=tuple(d.test_ids[i] for i in tests),
            num_classes=d.num_classes,
            k=s.k,
            wire_dtype=s.wire_dtype,
            epochs=s.local_epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            seed=s.seed,
        )

    def sharing(self, fleet: str) -> tuple[int, int]:
        """``(slots, images)`` of ``fleet``'s pool: its rows, and the distinct images among
        them (equal unless the fleet shares images)."""
        held = self.fleets[fleet].shares
        return len(held.pool), held.distinct

    def union(self, fleet: str) -> list[str]:
        """The distinct training images of ``fleet``'s pool (what its devices' shares cover)."""
        d = self.fleets[fleet]
        return [d.train_ids[int(i)] for i in dict.fromkeys(d.shares.pool.tolist())]

    def plot_shares(self, out: Path) -> list[Path]:
        """Each fleet's label-distribution plot and share-size histogram under ``out``."""
        paths: list[Path] = []
        for name, d in self.fleets.items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            sub = out if len(self.fleets) == 1 else out / safe
            paths += d.shares.plot(sub, title=name)
        return paths


def sharing_note(slots: int, images: int) -> str:
    """``"16,000 slots over 800 images"``: the devices' training images, counted per device
    and distinct."""
    return f"{slots:,} slots over {images:,} images"


def eval_pool(n_test: int, spec: FleetSpec) -> list[int]:
    """Indices into a test split of ``n_test`` images: the server's evaluation images (the
    first ``eval_images`` of the split's order seeded by ``seed + 1``)."""
    return pool_indices(n_test, min(n_test, spec.eval_images), spec.seed + 1).tolist()


def plan_fleet(spec: FleetSpec) -> FleetPlan:
    """The run's plan (see the module docstring); a trace of availability is read here."""
    names = [p for p, _ in spec.profiles]
    profiles = np.asarray(
        [names.index(p) for p in assign_profiles(spec.profiles, spec.num_devices)], dtype=np.uint8
    )
    fleets: dict[str, FleetData] = {}
    evals: dict[str, tuple[str, ...]] = {}
    first = 0
    for fleet in spec.fleets:
        data_task = spec.data_task(fleet.task)
        task = get_task(data_task)
        train, test = task.split("train"), task.split("test")
        pool = eval_pool(len(test), spec)
        test_ids = list(test.ids)
        evals.setdefault(fleet.task, tuple(test_ids[i] for i in pool))
        labels = list(train.labels)
        wanted = None if spec.train_per_device is None else fleet.devices * spec.train_per_device
        rows = pool_indices(len(labels), wanted, spec.seed, spec.share_images)
        parts = shares(
            labels, rows, spec.partitioner, spec.partitioner_args, fleet.devices, spec.seed
        )
        parts.indices(0)  # a partitioner that cannot split the pool says so now, not mid-run
        fleets[fleet.name] = FleetData(
            fleet, first, fleet.devices, data_task, task.num_classes, list(train.ids), test_ids,
            pool, parts,
        )  # fmt: skip
        first += fleet.devices
        slots, distinct = len(rows), parts.distinct
        if slots > distinct:
            log.info(
                "fleet %s: devices share images: %s", fleet.name, sharing_note(slots, distinct)
            )
    avail = parse(spec.availability).bind(spec.num_devices)
    return FleetPlan(spec, fleets, evals, avail, profiles)
