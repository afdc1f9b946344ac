"""The fleet loop, apart from how messages travel: plan devices, run rounds, aggregate, record.

:func:`plan_devices` turns a :class:`FleetSpec` into devices (task, profile, image ids);
:class:`FleetRunner` runs the rounds given two callables, ``train(jobs, states)`` and
``evaluate(jobs, states)``. The Flower ServerApp passes callables that send Messages to
ClientApps on Ray; the overhead benchmark passes ones that call :func:`run_device` in this
process. Dropouts and stragglers are decided here, recorded, and never averaged in.

Each device keeps one storage directory for the whole run (``<storage>/<fleet>/<device>``):
its feature cache, so it pays for its features once, in the round that first fetches them.
The fleets' initial weights are built here from the cloud's geometry (and, for Partial-1, the
pretrained block the cloud serves); the driver never builds the backbone either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mist_fed.core.methods import build_edge_net, starts_from_backbone
from mist_fed.data import get_task
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.errors import ConfigError
from mist_fed.fleet.aggregate import StateDict, fedavg
from mist_fed.fleet.device import (
    DROPPED,
    OK,
    STRAGGLER,
    DeviceJob,
    DeviceResult,
    SourceFactory,
)
from mist_fed.fleet.partition import sample_pool, split_indices
from mist_fed.fleet.spec import FleetSpec, TaskFleet, assign_profiles

log = logging.getLogger(__name__)

TrainFn = Callable[
    [Sequence[DeviceJob], Sequence[StateDict]], list[tuple[DeviceResult, StateDict | None]]
]
EvalFn = Callable[[Sequence[DeviceJob], Sequence[StateDict]], list[float]]


@dataclass(frozen=True)
class PlannedDevice:
    device: int
    fleet: TaskFleet
    profile: str
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    num_classes: int


def state_digest(state: StateDict) -> str:
    """A short content hash of a state dict (equal weights, equal digest)."""
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def initial_state(source: FeatureSource, method: str, num_classes: int, seed: int) -> StateDict:
    """A fleet's seeded initial edge net, sized from the cloud's geometry."""
    init = source.edge_init(method).state if starts_from_backbone(method) else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_edge_net(method, source.geometry(), num_classes, init)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def device_dir(root: str | Path, fleet: str, device: int) -> Path:
    """A device's storage under ``root``: ``<root>/<fleet, as a safe name>/<device>``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", fleet).strip("._") or "fleet"
    return Path(root) / safe / str(device)


def plan_devices(spec: FleetSpec) -> list[PlannedDevice]:
    """Every device of the run: its fleet, profile and share of the task's images."""
    profiles = assign_profiles(spec.profiles, spec.num_devices)
    out: list[PlannedDevice] = []
    for fleet in spec.fleets:
        task = get_task(fleet.task)
        train, test = task.split("train"), task.split("test")
        n = fleet.devices
        pool = sample_pool(len(train), n * spec.train_per_device, spec.seed)
        train_ids, train_labels = list(train.ids), list(train.labels)
        labels = [train_labels[i] for i in pool]
        shares = split_indices(labels, n, spec.split, spec.seed, spec.dirichlet_alpha)
        n_test = min(len(test), n * spec.test_per_device)
        test_pool = sample_pool(len(test), n_test, spec.seed + 1)
        test_all = list(test.ids)
        test_shares = np.array_split(np.asarray(test_pool), n)
        for j in range(n):
            dev = len(out)
            out.append(
                PlannedDevice(
                    device=dev,
                    fleet=fleet,
                    profile=profiles[dev],
                    train_ids=tuple(train_ids[pool[i]] for i in shares[j]),
                    test_ids=tuple(test_all[int(i)] for i in test_shares[j]),
                    num_classes=task.num_classes,
                )
            )
    return out


@dataclass
class RunRecords:
    """What a run produced: one dict per device per round, one per fleet per round."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    fleets: list[dict[str, Any]] = field(default_factory=list)
    final_states: dict[str, StateDict] = field(default_factory=dict)


class FleetRunner:
    """Rounds of train -> filter (failed, dropped, stragglers) -> aggregate per fleet -> evaluate."""

    def __init__(
        self,
        spec: FleetSpec,
        devices: Sequence[PlannedDevice],
        cloud: str,
        storage: str | Path,
        source: SourceFactory = FlightSource,
    ) -> None:
        """``storage``: the root of the devices' own directories (one per device, every round);
        ``source(cloud)``: where the fleets' initial weights are sized from."""
        self.spec = spec
        self.devices = list(devices)
        self.cloud = cloud
        self.storage = Path(storage)
        self.global_state: dict[str, StateDict] = {}
        self.device_state: dict[int, StateDict] = {}
        src = source(cloud)
        try:
            for fleet in spec.fleets:
                first = next(d for d in self.devices if d.fleet == fleet)
                # One seeded init per fleet: fedavg devices start equal, as do local ones.
                self.global_state[fleet.name] = initial_state(
                    src, fleet.method, first.num_classes, spec.seed
                )
        finally:
            close = getattr(src, "close", None)
            if callable(close):
                close()

    def job(self, d: PlannedDevice, rnd: int) -> DeviceJob:
        s = self.spec
        return DeviceJob(
            device=d.device,
            fleet=d.fleet.name,
            task=d.fleet.task,
            method=d.fleet.method,
            profile=d.profile,
            round=rnd,
            train_ids=d.train_ids,
            test_ids=d.test_ids,
            num_classes=d.num_classes,
            cloud=self.cloud,
            storage=str(device_dir(self.storage, d.fleet.name, d.device)),
            k=s.k,
            wire_dtype=s.wire_dtype,
            epochs=s.local_epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            seed=s.seed,
        )

    def state_for(self, d: PlannedDevice) -> StateDict:
        if d.fleet.aggregation == "local" and d.device in self.device_state:
            return self.device_state[d.device]
        return self.global_state[d.fleet.name]

    def dropped(self, rnd: int) -> set[int]:
        if self.spec.dropout <= 0:
            return set()
        rng = np.random.default_rng([self.spec.seed, 4241, rnd])
        draws = rng.random(len(self.devices))
        return {d.device for d, u in zip(self.devices, draws, strict=True) if u < self.spec.dropout}

    def run(
        self,
        train: TrainFn,
        evaluate: EvalFn,
        on_result: Callable[[DeviceResult], None] | None = None,
        records: RunRecords | None = None,
    ) -> RunRecords:
        """Run every round; each round's rows go into ``records`` (a new one by default)."""
        rec = RunRecords() if records is None else records
        by_id = {d.device: d for d in self.devices}
        for rnd in range(1, self.spec.rounds + 1):
            log.info("round %d of %d", rnd, self.spec.rounds)
            dropped = self.dropped(rnd)
            active = [d for d in self.devices if d.device not in dropped]
            jobs = [self.job(d, rnd) for d in active]
            sent = [self.state_for(d) for d in active]
            received = {d.device: state_digest(s) for d, s in zip(active, sent, strict=True)}
            outs = train(jobs, sent) if jobs else []
            results: dict[int, tuple[DeviceResult, StateDict | None]] = {}
            for res, st in outs:
                if res.status == OK and self._late(res):
                    res.status = STRAGGLER
                    res.reason = f"deadline: {res.transfer_s + res.compute_s:.1f} s > {self.spec.deadline_s} s"
                    st = None
                results[res.device] = (res, st)
                if on_result:
                    on_result(res)
            for dev in sorted(dropped):
                res = DeviceResult(device=dev, round=rnd, status=DROPPED, reason="dropout")
                results[dev] = (res, None)
                if on_result:
                    on_result(res)
            global_acc = self._aggregate_and_evaluate(rnd, results, by_id, evaluate)
            rows: list[dict[str, Any]] = []
            for dev in sorted(results):
                res, _ = results[dev]
                d = by_id[dev]
                row = {
                    "round": rnd,
                    "device": dev,
                    "fleet": d.fleet.name,
                    "task": d.fleet.task,
                    "method": d.fleet.method,
                    "aggregation": d.fleet.aggregation,
                    "profile": d.profile,
                    **{
                        k: v
                        for k, v in dataclasses.asdict(res).items()
                        if k not in ("device", "round")
                    },
                    "global_accuracy": global_acc.get(dev, math.nan),
                    "received_digest": received.get(dev, ""),
                }
                rows.append(row)
            # A round's rows land together, so a run stopped mid-round leaves whole rounds.
            rec.devices.extend(rows)
            rec.fleets.extend(self._fleet_rows(rnd, results, by_id, global_acc))
        rec.final_states = dict(self.global_state)
        for dev, st in self.device_state.items():
            rec.final_states[f"device-{dev}"] = st
        return rec

    def _late(self, res: DeviceResult) -> bool:
        return self.spec.deadline_s is not None and (
            res.transfer_s + res.compute_s > self.spec.deadline_s
        )

    def _aggregate_and_evaluate(
        self,
        rnd: int,
        results: dict[int, tuple[DeviceResult, StateDict | None]],
        by_id: dict[int, PlannedDevice],
        evaluate: EvalFn,
    ) -> dict[int, float]:
        eval_jobs: list[DeviceJob] = []
        eval_states: list[StateDict] = []
        for fleet in self.spec.fleets:
            done = [
                (dev, st, res.num_examples)
                for dev, (res, st) in results.items()
                if by_id[dev].fleet == fleet and res.status == OK and st is not None
            ]
            if fleet.aggregation == "local":
                for dev, st, _ in done:
                    self.device_state[dev] = st
                continue
            if not done:
                log.warning(
                    "round %d: no device of fleet %s finished; weights kept", rnd, fleet.name
                )
                continue
            self.global_state[fleet.name] = fedavg([s for _, s, _ in done], [n for *_, n in done])
            for dev, _, _ in done:
                eval_jobs.append(self.job(by_id[dev], rnd))
                eval_states.append(self.global_state[fleet.name])
        if not eval_jobs:
            return {}
        accs = evaluate(eval_jobs, eval_states)
        return {j.device: a for j, a in zip(eval_jobs, accs, strict=True)}

    def _fleet_rows(
        self,
        rnd: int,
        results: dict[int, tuple[DeviceResult, StateDict | None]],
        by_id: dict[int, PlannedDevice],
        global_acc: dict[int, float],
    ) -> list[dict[str, Any]]:
        rows = []
        for fleet in self.spec.fleets:
            rs = [res for dev, (res, _) in results.items() if by_id[dev].fleet == fleet]
            ok = [r for r in rs if r.status == OK]
            n_test = {r.device: len(by_id[r.device].test_ids) for r in ok}
            acc_of = (
                (lambda r: global_acc.get(r.device, math.nan))
                if fleet.aggregation == "fedavg"
                else (lambda r: r.accuracy)
            )
            w = sum(n_test.values())
            acc = sum(acc_of(r) * n_test[r.device] for r in ok) / w if w else math.nan
            images = sum(r.images_down for r in rs)
            rows.append(
                {
                    "round": rnd,
                    "fleet": fleet.name,
                    "task": fleet.task,
                    "method": fleet.method,
                    "aggregation": fleet.aggregation,
                    "devices": len(rs),
                    "ok": len(ok),
                    "failed": sum(r.status == "failed" for r in rs),
                    "dropped": sum(r.status == DROPPED for r in rs),
                    "stragglers": sum(r.status == STRAGGLER for r in rs),
                    "accuracy": acc,
                    "mean_device_accuracy": (
                        float(np.mean([r.accuracy for r in ok])) if ok else math.nan
                    ),
                    "bytes_down": sum(r.bytes_down for r in rs),
                    "bytes_up": sum(r.bytes_up for r in rs),
                    "feature_bytes": sum(r.feature_bytes for r in rs),
                    "images_down": images,
                    "bytes_per_image": (sum(r.feature_bytes for r in rs) / images)
                    if images
                    else math.nan,
                    "transfer_s": float(np.mean([r.transfer_s for r in ok])) if ok else math.nan,
                    "compute_s": float(np.mean([r.compute_s for r in ok])) if ok else math.nan,
                    "round_time_s": max((r.transfer_s + r.compute_s for r in ok), default=math.nan),
                    "peak_mem_mb": max((r.peak_mem_mb for r in rs), default=math.nan),
                }
            )
        return rows


def local_train_fn(
    jobs: Sequence[DeviceJob], states: Sequence[StateDict]
) -> list[tuple[DeviceResult, StateDict | None]]:
    """The plain in-process loop: the same device function, one device after another."""
    from mist_fed.fleet.device import run_device

    return [run_device(j, s) for j, s in zip(jobs, states, strict=True)]


def local_eval_fn(jobs: Sequence[DeviceJob], states: Sequence[StateDict]) -> list[float]:
    from mist_fed.fleet.device import evaluate_device

    return [evaluate_device(j, s) for j, s in zip(jobs, states, strict=True)]


def check_devices(spec: FleetSpec, nodes: int) -> None:
    if nodes < spec.num_devices:
        raise ConfigError(
            f"the fleet has {spec.num_devices} devices but only {nodes} Flower nodes; "
            f"run with num-supernodes = {spec.num_devices} (or lower --devices)"
        )
