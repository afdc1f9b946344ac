"""The fleet loop, apart from how messages travel: plan devices, run rounds, aggregate, record.

:func:`plan_devices` turns a :class:`FleetSpec` into devices (task, profile, image ids);
:class:`FleetRunner` runs the rounds given one callable, ``train(jobs, states)``. The Flower
ServerApp passes one that sends Messages to ClientApps on Ray; the overhead benchmark passes
one that calls :func:`run_device` in this process. Each fleet's Flower strategy
(:mod:`mist_fed.fleet.strategies`) picks the round's devices from its view of the Grid and
aggregates their replies; dropouts and stragglers are decided here, recorded, and never
averaged in. The global models are scored on the server, next to each fleet's centralized
reference (:mod:`mist_fed.fleet.reference`), and each round's simulated wall-clock is the
slowest participating device's transfer + compute (FedScale's virtual clock).

Each device keeps one storage directory for the whole run (``<run>/<fleet>/<device>`` under
the device-storage root of the node that runs it, :mod:`mist_fed.fleet.storage`): its feature
cache, so it pays for its features once, in the round that first fetches them.
The fleets' initial weights are built here from the cloud's geometry (and, for Partial-1, the
pretrained block the cloud serves); the driver never builds the backbone either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from mist_fed.core.methods import build_edge_net, starts_from_backbone
from mist_fed.data import get_task
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.errors import ConfigError
from mist_fed.fleet import strategies
from mist_fed.fleet.device import (
    DROPPED,
    OK,
    STRAGGLER,
    DeviceJob,
    DeviceResult,
    SourceFactory,
    StateDict,
    close_source,
)
from mist_fed.fleet.flower import local_identity
from mist_fed.fleet.messages import strategy_reply, to_state
from mist_fed.fleet.partition import sample_pool, share_images, shared
from mist_fed.fleet.reference import CentralResult, Reference, central_epochs
from mist_fed.fleet.spec import FleetSpec, TaskFleet, assign_profiles
from mist_fed.fleet.storage import RunStorage
from mist_fed.wire.dtypes import wire_projection

log = logging.getLogger(__name__)

TrainFn = Callable[
    [Sequence[DeviceJob], Sequence[StateDict]], list[tuple[DeviceResult, StateDict | None]]
]
Results = dict[int, tuple[DeviceResult, StateDict | None]]


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


def initial_state(
    source: FeatureSource, method: str, num_classes: int, seed: int, wire: str = "float32"
) -> StateDict:
    """A fleet's seeded initial edge net, sized from the cloud's geometry and the wire."""
    init = source.edge_init(method).state if starts_from_backbone(method) else None
    g = source.geometry()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_edge_net(method, g, num_classes, init, projection=wire_projection(wire))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def plan_devices(spec: FleetSpec) -> list[PlannedDevice]:
    """Every device of the run: its fleet, profile and share of the task's images.

    Training shares are disjoint while the task's training split holds the fleet's
    ``devices x train_per_device`` images; beyond that devices share images
    (:func:`~mist_fed.fleet.partition.share_images`; :func:`image_sharing` says how many).
    Test shares are drawn from the server's evaluation images (the first ``eval_images`` of
    the test split's seeded permutation), shared the same way when they are too few.
    """
    profiles = assign_profiles(spec.profiles, spec.num_devices)
    out: list[PlannedDevice] = []
    for fleet in spec.fleets:
        task = get_task(fleet.task)
        train, test = task.split("train"), task.split("test")
        n = fleet.devices
        train_ids = list(train.ids)
        shares = share_images(
            list(train.labels), n, spec.train_per_device, spec.split, spec.seed,
            spec.dirichlet_alpha,
        )  # fmt: skip
        test_all = list(test.ids)
        n_eval = min(len(test), spec.eval_images)
        if not shared(n, spec.test_per_device, n_eval):
            n_test = min(len(test), n * spec.test_per_device)
            test_pool = sample_pool(len(test), n_test, spec.seed + 1)
            test_shares = [s.tolist() for s in np.array_split(np.asarray(test_pool), n)]
        else:  # more devices than the evaluation images cover: they share those
            eval_pool = sample_pool(len(test), n_eval, spec.seed + 1)
            per = min(spec.test_per_device, n_eval)
            test_shares = [
                [eval_pool[i] for i in s]
                for s in share_images([0] * n_eval, n, per, "iid", spec.seed + 1)
            ]
        for j in range(n):
            dev = len(out)
            out.append(
                PlannedDevice(
                    device=dev,
                    fleet=fleet,
                    profile=profiles[dev],
                    train_ids=tuple(train_ids[i] for i in shares[j]),
                    test_ids=tuple(test_all[int(i)] for i in test_shares[j]),
                    num_classes=task.num_classes,
                )
            )
    return out


def sharing_note(slots: int, images: int) -> str:
    """``"16,000 slots over 800 images"``: the devices' training images, counted per device
    and distinct."""
    return f"{slots:,} slots over {images:,} images"


def image_sharing(devices: Sequence[PlannedDevice], fleet: TaskFleet) -> tuple[int, int]:
    """``(slots, images)`` of ``fleet``'s training shares: the devices' images counted per
    device, and the distinct ones (equal when no two devices share an image)."""
    ids = [i for d in devices if d.fleet == fleet for i in d.train_ids]
    return len(ids), len(set(ids))


@dataclass
class RunRecords:
    """What a run produced: one dict per device per round, one per fleet per round."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    fleets: list[dict[str, Any]] = field(default_factory=list)
    final_states: dict[str, StateDict] = field(default_factory=dict)
    # time.perf_counter() stamps of this process: "start" (the devices are planned from
    # here) and "end" (the last round recorded), so a caller can tell runtime start-up apart
    timing: dict[str, float] = field(default_factory=dict)


def _like(state: StateDict, template: StateDict) -> StateDict:
    """``state`` with ``template``'s dtypes (Flower's arithmetic runs in numpy)."""
    return {k: state[k].to(template[k].dtype).contiguous() for k in template}


class FleetRunner:
    """Rounds of sample -> train -> filter (failed, dropped, stragglers) -> aggregate -> score."""

    def __init__(
        self,
        spec: FleetSpec,
        devices: Sequence[PlannedDevice],
        cloud: str,
        storage: RunStorage,
        source: SourceFactory = FlightSource,
        node_ids: Sequence[int] | None = None,
        reference: Reference | None = None,
        progress: bool = False,
    ) -> None:
        """``storage``: the run's device storage; each device's job names its own directory
        in it (one per device, every round), the server's is ``_server/`` on this machine (a
        name no fleet directory can take). ``source(cloud)``: where the fleets' initial
        weights are sized from; ``node_ids[device]``: the device's node on the Grid (default:
        its number)."""
        self.spec = spec
        self.devices = list(devices)
        self.cloud = cloud
        self.storage = storage
        self.node_of = {
            d.device: (d.device if node_ids is None else int(node_ids[d.device]))
            for d in self.devices
        }
        self.reference = reference or Reference(
            spec, cloud, storage.path / "_server", source, progress=progress
        )
        self.members = {f.name: [d for d in self.devices if d.fleet == f] for f in spec.fleets}
        self.strategies = {
            f.name: strategies.build(f.aggregation, f.aggregation_args, f.devices)
            for f in spec.fleets
        }
        self.views = {
            f.name: strategies.FleetView([self.node_of[d.device] for d in self.members[f.name]])
            for f in spec.fleets
        }
        self.global_state: dict[str, StateDict] = {}
        self.device_state: dict[int, StateDict] = {}
        self.central: dict[str, CentralResult] = {}
        self.num_classes = {f.name: self.members[f.name][0].num_classes for f in spec.fleets}
        self.sharing = {f.name: image_sharing(self.devices, f) for f in spec.fleets}
        for name, (slots, distinct) in self.sharing.items():
            if slots > distinct:
                log.info("fleet %s: devices share images: %s", name, sharing_note(slots, distinct))
        src = source(cloud)
        try:
            for fleet in spec.fleets:
                # One seeded init per fleet: its devices start equal, federated or local.
                self.global_state[fleet.name] = initial_state(
                    src, fleet.method, self.num_classes[fleet.name], spec.seed, spec.wire_dtype
                )
        finally:
            close_source(src)

    def job(self, d: PlannedDevice, rnd: int, config: dict[str, Any] | None = None) -> DeviceJob:
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
            storage=self.storage.location(d.fleet.name, d.device),
            k=s.k,
            wire_dtype=s.wire_dtype,
            epochs=s.local_epochs,
            batch_size=s.batch_size,
            lr=s.lr * s.lr_decay ** (rnd - 1),
            seed=s.seed,
            proximal_mu=float((config or {}).get("proximal-mu", 0.0)),
        )

    def state_for(self, d: PlannedDevice) -> StateDict:
        if d.fleet.aggregation == strategies.LOCAL and d.device in self.device_state:
            return self.device_state[d.device]
        return self.global_state[d.fleet.name]

    # -- the strategy's two calls ------------------------------------------------------------
    def sample(self, fleet: TaskFleet, rnd: int) -> tuple[list[PlannedDevice], dict[str, Any]]:
        """The devices ``fleet``'s strategy picks for round ``rnd``, and its config for them."""
        strategy = self.strategies[fleet.name]
        members = self.members[fleet.name]
        if strategy is None:  # local: every device trains its own model
            return members, {}
        arrays = ArrayRecord(self.global_state[fleet.name])
        index = self.spec.fleets.index(fleet)
        with (
            local_identity(),
            strategies.quiet(),
            strategies.seeded_sampling(self.spec.seed * 100_003 + rnd * 97 + index),
        ):
            msgs = list(
                strategy.configure_train(
                    rnd, arrays, ConfigRecord(), cast(Grid, self.views[fleet.name])
                )
            )
        by_node = {self.node_of[d.device]: d for d in members}
        chosen = sorted((by_node[m.metadata.dst_node_id] for m in msgs), key=lambda d: d.device)
        config = (
            dict(
                msgs[0].content.config_records.get(
                    getattr(strategy, "configrecord_key", "config"), {}
                )
            )
            if msgs
            else {}
        )
        return chosen, config

    def aggregate(self, fleet: TaskFleet, rnd: int, done: list[tuple[int, StateDict, int]]) -> bool:
        """Hand ``(device, state, num_examples)`` of the devices that finished to the fleet's
        strategy; its result becomes the global model. ``False`` when it returned none.

        ``done`` is consumed: each state is let go once its reply is made, so a round holds
        one copy of its devices' weights, not two."""
        strategy = self.strategies[fleet.name]
        assert strategy is not None
        with local_identity(), strategies.quiet():
            replies = []
            done.reverse()
            while done:
                dev, st, n = done.pop()
                replies.append(strategy_reply(st, n, self.node_of[dev]))
                del st
            arrays, _ = strategy.aggregate_train(rnd, replies)
            del replies
        if arrays is None:
            return False
        self.global_state[fleet.name] = _like(to_state(arrays), self.global_state[fleet.name])
        return True

    def share(self, fleet: TaskFleet) -> float:
        """The expected share of ``fleet``'s devices that train in a round."""
        n = fleet.devices
        strategy = self.strategies[fleet.name]
        sampled = n
        if strategy is not None:
            frac = float(getattr(strategy, "fraction_train", 1.0))
            sampled = min(n, max(int(n * frac), int(getattr(strategy, "min_train_nodes", 1))))
        return sampled / n * (1.0 - self.spec.dropout)

    def dropped(self, rnd: int) -> set[int]:
        if self.spec.dropout <= 0:
            return set()
        rng = np.random.default_rng([self.spec.seed, 4241, rnd])
        draws = rng.random(len(self.devices))
        return {d.device for d, u in zip(self.devices, draws, strict=True) if u < self.spec.dropout}

    # -- the run -----------------------------------------------------------------------------
    def run_central(self) -> None:
        """Each fleet's centralized reference (once per run, before the rounds)."""
        for fleet in self.spec.fleets:
            if fleet.name in self.central:
                continue
            # The union of the devices' images; where they share images, more epochs over it
            # make the same sample-steps as the fleet's (slots / distinct images as many).
            ids = list(dict.fromkeys(i for d in self.members[fleet.name] for i in d.train_ids))
            slots, distinct = self.sharing[fleet.name]
            epochs = central_epochs(self.spec, self.share(fleet) * slots / distinct)
            log.info(
                "fleet %s: central reference on %d images, %d epochs", fleet.name, len(ids), epochs
            )
            self.central[fleet.name] = self.reference.central(
                fleet, self.num_classes[fleet.name], ids, self.global_state[fleet.name], epochs
            )
            log.info(
                "fleet %s: central accuracy %.4f", fleet.name, self.central[fleet.name].accuracy
            )

    def run(
        self,
        train: TrainFn,
        on_result: Callable[[DeviceResult], None] | None = None,
        records: RunRecords | None = None,
        on_round: Callable[[RunRecords], None] | None = None,
    ) -> RunRecords:
        """The central references, then every round; each round's rows go into ``records``
        (then ``on_round`` gets them, e.g. to write what a run killed later would lose)."""
        rec = RunRecords() if records is None else records
        by_id = {d.device: d for d in self.devices}
        self.run_central()
        clock = {f.name: (0.0, 0.0, 0) for f in self.spec.fleets}  # time, device-hours, steps
        for rnd in range(1, self.spec.rounds + 1):
            log.info("round %d of %d", rnd, self.spec.rounds)
            picked: list[PlannedDevice] = []
            configs: dict[str, dict[str, Any]] = {}
            for fleet in self.spec.fleets:
                chosen, configs[fleet.name] = self.sample(fleet, rnd)
                picked.extend(chosen)
            dropped = self.dropped(rnd) & {d.device for d in picked}
            active = [d for d in picked if d.device not in dropped]
            jobs = [self.job(d, rnd, configs[d.fleet.name]) for d in active]
            sent = [self.state_for(d) for d in active]
            digests = {id(s): state_digest(s) for s in sent}  # a few distinct states
            received = {d.device: digests[id(s)] for d, s in zip(active, sent, strict=True)}
            del digests
            outs = train(jobs, sent) if jobs else []
            results: Results = {}
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
            scores = self._aggregate_and_score(rnd, results, by_id)
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
                    "received_digest": received.get(dev, ""),
                }
                rows.append(row)
            # A round's rows land together, so a run stopped mid-round leaves whole rounds.
            rec.devices.extend(rows)
            rec.fleets.extend(self._fleet_rows(rnd, results, by_id, scores, clock))
            if on_round:
                on_round(rec)
        rec.final_states = dict(self.global_state)
        for dev, st in self.device_state.items():
            rec.final_states[f"device-{dev}"] = st
        return rec

    def _late(self, res: DeviceResult) -> bool:
        return self.spec.deadline_s is not None and (
            res.transfer_s + res.compute_s > self.spec.deadline_s
        )

    def _aggregate_and_score(
        self, rnd: int, results: Results, by_id: dict[int, PlannedDevice]
    ) -> dict[str, float]:
        """Aggregate each federated fleet and score its global model on the server."""
        scores: dict[str, float] = {}
        for fleet in self.spec.fleets:
            done = [
                (dev, st, res.num_examples)
                for dev, (res, st) in sorted(results.items())
                if by_id[dev].fleet == fleet and res.status == OK and st is not None
            ]
            if fleet.aggregation == strategies.LOCAL:
                for dev, st, _ in done:
                    self.device_state[dev] = st
                continue
            for dev, _, _ in done:  # the states live on in ``done`` only, until aggregated
                results[dev] = (results[dev][0], None)
            if not done or not self.aggregate(fleet, rnd, done):
                log.warning("round %d: fleet %s has no new model; weights kept", rnd, fleet.name)
            scores[fleet.name] = self.reference.evaluate(
                fleet, self.num_classes[fleet.name], self.global_state[fleet.name]
            )
        return scores

    def _fleet_rows(
        self,
        rnd: int,
        results: Results,
        by_id: dict[int, PlannedDevice],
        scores: dict[str, float],
        clock: dict[str, tuple[float, float, int]],
    ) -> list[dict[str, Any]]:
        rows = []
        for fleet in self.spec.fleets:
            rs = [res for dev, (res, _) in results.items() if by_id[dev].fleet == fleet]
            ok = [r for r in rs if r.status == OK]
            if fleet.name in scores:
                acc = scores[fleet.name]
            else:  # local: each device's own model on its own test images
                n_test = {r.device: len(by_id[r.device].test_ids) for r in ok}
                w = sum(n_test.values())
                acc = sum(r.accuracy * n_test[r.device] for r in ok) / w if w else math.nan
            ran = [r for r in rs if r.status != DROPPED]
            times = [r.transfer_s + r.compute_s for r in ran]
            round_s = max(times, default=0.0)
            if self.spec.deadline_s is not None:
                round_s = min(round_s, self.spec.deadline_s)
            t, hours, steps = clock[fleet.name]
            clock[fleet.name] = (
                t + round_s,
                hours + sum(times) / 3600.0,
                steps + sum(self.spec.local_epochs * r.num_examples for r in ok),
            )
            central = self.central.get(fleet.name)
            images = sum(r.images_down for r in rs)
            feature_bytes = sum(r.feature_bytes for r in rs)
            rows.append(
                {
                    "round": rnd,
                    "fleet": fleet.name,
                    "task": fleet.task,
                    "method": fleet.method,
                    "aggregation": fleet.aggregation,
                    "devices": fleet.devices,
                    "sampled": len(rs),
                    "ok": len(ok),
                    "failed": sum(r.status == "failed" for r in rs),
                    "dropped": sum(r.status == DROPPED for r in rs),
                    "stragglers": sum(r.status == STRAGGLER for r in rs),
                    "accuracy": acc,
                    "central_accuracy": central.accuracy if central else math.nan,
                    "eval_images": (
                        len(self.reference.eval_ids(fleet.task))
                        if fleet.name in scores
                        else sum(len(by_id[r.device].test_ids) for r in ok)
                    ),
                    "mean_device_accuracy": (
                        float(np.mean([r.accuracy for r in ok])) if ok else math.nan
                    ),
                    "sample_steps": clock[fleet.name][2],
                    "central_sample_steps": central.sample_steps if central else 0,
                    "bytes_down": sum(r.bytes_down for r in rs),
                    "bytes_up": sum(r.bytes_up for r in rs),
                    "feature_bytes": feature_bytes,
                    "train_slots": self.sharing[fleet.name][0],
                    "train_images": self.sharing[fleet.name][1],
                    "images_down": images,
                    "bytes_per_image": feature_bytes / images if images else math.nan,
                    "transfer_s": float(np.mean([r.transfer_s for r in ok])) if ok else math.nan,
                    "compute_s": float(np.mean([r.compute_s for r in ok])) if ok else math.nan,
                    "round_time_s": round_s,
                    "sim_time_s": clock[fleet.name][0],
                    "device_hours": sum(times) / 3600.0,
                    "sim_device_hours": clock[fleet.name][1],
                    "peak_mem_mb": max((r.peak_mem_mb for r in rs), default=math.nan),
                }
            )
        return rows


def local_train_fn(
    jobs: Sequence[DeviceJob], states: Sequence[StateDict]
) -> list[tuple[DeviceResult, StateDict | None]]:
    """The plain in-process loop: the same device function, one device after another (their
    storage under this process's root, where :func:`~mist_fed.fleet.storage.device_storage`
    makes the run's)."""
    from mist_fed.fleet.device import run_device

    return [run_device(j, s) for j, s in zip(jobs, states, strict=True)]


def check_devices(spec: FleetSpec, nodes: int) -> None:
    if nodes < spec.num_devices:
        raise ConfigError(
            f"the fleet has {spec.num_devices} devices but only {nodes} Flower nodes; "
            f"run with num-supernodes = {spec.num_devices} (or lower --devices)"
        )
