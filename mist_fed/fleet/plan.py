"""A fleet spec made concrete: every device (fleet, profile, share of the task's images) and the
server's evaluation images, computed once per run from the spec and its seed.

:func:`plan_fleet` reads the tasks' splits (ids and labels, never images). Training shares are
disjoint while the task's training split holds the fleet's ``devices x train_per_device``
images; beyond that devices share images (:func:`~mist_fed.fleet.partition.share_images`;
:meth:`FleetPlan.sharing` says how many). The server's evaluation images of a task are the
first ``eval_images`` of a seeded order of its test split; the devices' test shares are drawn
from those same images (shared the same way when they are too few), so the cloud embeds them
once and every score of a task (each round's global model, the central reference) is paired.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mist_fed.data import get_task
from mist_fed.fleet.job import DeviceJob
from mist_fed.fleet.partition import sample_pool, share_images, shared
from mist_fed.fleet.spec import FleetSpec, TaskFleet, assign_profiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetPlan:
    """Every device of the run as a round-0 :class:`DeviceJob`, and the evaluation images."""

    spec: FleetSpec
    devices: tuple[DeviceJob, ...]
    eval_ids: dict[str, tuple[str, ...]]  # task -> the server's evaluation images

    def fleet(self, name: str) -> TaskFleet:
        return next(f for f in self.spec.fleets if f.name == name)

    def members(self, fleet: str) -> list[DeviceJob]:
        return [d for d in self.devices if d.fleet == fleet]

    def num_classes(self, fleet: str) -> int:
        return self.members(fleet)[0].num_classes

    def sharing(self, fleet: str) -> tuple[int, int]:
        """``(slots, images)`` of ``fleet``'s training shares: the devices' images counted per
        device, and the distinct ones (equal when no two devices share an image)."""
        ids = [i for d in self.members(fleet) for i in d.train_ids]
        return len(ids), len(set(ids))

    def union(self, fleet: str) -> list[str]:
        """The distinct training images of ``fleet``'s devices, in first-seen order."""
        return list(dict.fromkeys(i for d in self.members(fleet) for i in d.train_ids))


def sharing_note(slots: int, images: int) -> str:
    """``"16,000 slots over 800 images"``: the devices' training images, counted per device
    and distinct."""
    return f"{slots:,} slots over {images:,} images"


def eval_pool(n_test: int, spec: FleetSpec) -> list[int]:
    """Indices into a test split of ``n_test`` images: the server's evaluation images (the
    first ``eval_images`` of the split's order seeded by ``seed + 1``), whose prefixes the
    devices' test shares are."""
    return sample_pool(n_test, min(n_test, spec.eval_images), spec.seed + 1)


def _test_shares(pool: Sequence[int], devices: int, spec: FleetSpec) -> list[list[int]]:
    """Each device's test images, as indices into the split: disjoint prefixes of ``pool``
    while it holds them all, else shared (each device's still distinct)."""
    if not shared(devices, spec.test_per_device, len(pool)):
        used = np.asarray(pool[: devices * spec.test_per_device])
        return [s.tolist() for s in np.array_split(used, devices)]
    per = min(spec.test_per_device, len(pool))
    shares = share_images([0] * len(pool), devices, per, "iid", spec.seed + 1)
    return [[pool[i] for i in s] for s in shares]


def plan_fleet(spec: FleetSpec) -> FleetPlan:
    """Every device of ``spec`` and the server's evaluation images (see the module docstring)."""
    profiles = assign_profiles(spec.profiles, spec.num_devices)
    devices: list[DeviceJob] = []
    evals: dict[str, tuple[str, ...]] = {}
    for fleet in spec.fleets:
        task = get_task(fleet.task)
        train, test = task.split("train"), task.split("test")
        pool = eval_pool(len(test), spec)
        test_ids = list(test.ids)
        evals.setdefault(fleet.task, tuple(test_ids[i] for i in pool))
        shares = share_images(
            list(train.labels), fleet.devices, spec.train_per_device, spec.split, spec.seed,
            spec.dirichlet_alpha,
        )  # fmt: skip
        tests = _test_shares(pool, fleet.devices, spec)
        train_ids = list(train.ids)
        for share, test_share in zip(shares, tests, strict=True):
            devices.append(
                DeviceJob(
                    device=len(devices),
                    fleet=fleet.name,
                    task=fleet.task,
                    method=fleet.method,
                    profile=profiles[len(devices)],
                    train_ids=tuple(train_ids[i] for i in share),
                    test_ids=tuple(test_ids[int(i)] for i in test_share),
                    num_classes=task.num_classes,
                    k=spec.k,
                    wire_dtype=spec.wire_dtype,
                    epochs=spec.local_epochs,
                    batch_size=spec.batch_size,
                    lr=spec.lr,
                    seed=spec.seed,
                )
            )
    plan = FleetPlan(spec, tuple(devices), evals)
    for f in spec.fleets:
        slots, distinct = plan.sharing(f.name)
        if slots > distinct:
            log.info("fleet %s: devices share images: %s", f.name, sharing_note(slots, distinct))
    return plan
