"""One device's work in one round, as a pure function of a :class:`DeviceJob`: no Flower, no Ray.

:func:`run_device` fetches the device's features from the cloud (once per device: later
rounds find them on the device), builds its edge net from the weights it was sent, trains and
evaluates it under the profile's thread count, and measures what it cost: bytes streamed,
transfer time from those bytes and the profile's bandwidth, compute time measured on this host
and scaled to the device, and peak memory against the profile's cap. A device over its cap is
reported ``failed`` with the reason; its weights are not returned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mist_fed.fed._standins import (
    FeatureClient,
    TrainConfig,
    compute_seconds,
    evaluate,
    fit,
    load_profile,
    profile_resources,
    transfer_seconds,
)
from mist_fed.fed.spec import BackboneConfig
from mist_fed.model.backbone import Backbone, create_backbone
from mist_fed.model.methods import build_edge_net, method_gather
from mist_fed.wire.features import FeatureSet

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

OK, FAILED, DROPPED, STRAGGLER = "ok", "failed", "dropped", "straggler"
STATUSES = (OK, FAILED, DROPPED, STRAGGLER)


@dataclass(frozen=True)
class DeviceJob:
    """What the server asks of one device in one round (travels as a Flower ConfigRecord)."""

    device: int
    fleet: str
    task: str
    method: str
    profile: str
    round: int
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    num_classes: int
    cloud: str
    backbone: BackboneConfig
    k: int | None = None
    wire_dtype: str = "float16"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    first_contact: bool = True  # the device downloads its features in this round

    def to_config(self) -> dict[str, Any]:
        """Flat values a Flower ConfigRecord accepts."""
        d = dataclasses.asdict(self)
        d["train_ids"] = list(self.train_ids)
        d["test_ids"] = list(self.test_ids)
        d["backbone"] = json.dumps(dataclasses.asdict(self.backbone))
        d["k"] = -1 if self.k is None else self.k
        return d

    @classmethod
    def from_config(cls, cfg: Any) -> DeviceJob:
        d = {f.name: cfg[f.name] for f in dataclasses.fields(cls)}
        d["train_ids"] = tuple(d["train_ids"])
        d["test_ids"] = tuple(d["test_ids"])
        d["backbone"] = BackboneConfig(**json.loads(d["backbone"]))
        d["k"] = None if int(d["k"]) < 0 else int(d["k"])
        return cls(**d)


@dataclass
class DeviceResult:
    """One row of ``devices.parquet`` (before the fleet columns are added)."""

    device: int
    round: int
    status: str
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    transfer_s: float = 0.0
    compute_s: float = 0.0
    host_compute_s: float = 0.0
    peak_mem_mb: float = 0.0
    mem_cap_mb: float = 0.0
    num_examples: int = 0
    images_down: int = 0
    accuracy: float = float("nan")
    train_loss: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float | int]:
        d = dataclasses.asdict(self)
        d.pop("status")
        d.pop("reason")
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_metrics(cls, status: str, reason: str, m: Any) -> DeviceResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"status", "reason", "extra"}
        kw = {k: m[k] for k in names if k in m}
        kw["device"], kw["round"] = int(kw["device"]), int(kw["round"])
        for key in ("bytes_down", "bytes_up", "num_examples", "images_down"):
            kw[key] = int(kw.get(key, 0))
        return cls(status=status, reason=reason, **kw)


# -- per-process caches (a Ray actor serves many devices over a run) ---------------------------

_BACKBONES: dict[str, Backbone] = {}
_FEATURES: OrderedDict[tuple[Any, ...], tuple[FeatureSet, int]] = OrderedDict()
_FEATURE_CACHE_BYTES = int(os.environ.get("MIST_FED_WORKER_CACHE_MB", "2048")) << 20


def get_backbone(cfg: BackboneConfig) -> Backbone:
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _BACKBONES:
        _BACKBONES[key] = create_backbone(
            cfg.name,
            weights=cfg.weights,
            random_init=cfg.random_init,
            seed=cfg.seed,
            **cfg.model_kwargs,
        )
    return _BACKBONES[key]


def build_net(job: DeviceJob, state: StateDict | None = None) -> nn.Module:
    net = build_edge_net(job.method, get_backbone(job.backbone), job.num_classes)
    if state is not None:
        net.load_state_dict(state)
    return net


def _fetch(job: DeviceJob, split: str, ids: tuple[str, ...]) -> tuple[FeatureSet, int]:
    """Features of ``ids`` and the bytes streamed for them (cached per worker process)."""
    spec = method_gather(job.method, get_backbone(job.backbone), job.k)
    key = (job.cloud, job.task, split, spec.kind, spec.k, job.wire_dtype, ids)
    hit = _FEATURES.get(key)
    if hit is not None:
        _FEATURES.move_to_end(key)
        return hit
    client = FeatureClient(job.cloud)
    fs = client.get(
        job.task,
        split,
        spec.kind,
        spec.k,
        job.wire_dtype,
        ids=list(ids),
        backbone=get_backbone(job.backbone),
    )
    nbytes = int(client.bytes_received)
    _FEATURES[key] = (fs, nbytes)
    while sum(f.features.nbytes for f, _ in _FEATURES.values()) > _FEATURE_CACHE_BYTES:
        _FEATURES.popitem(last=False)
    return fs, nbytes


# -- memory ------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak resident memory this job adds to its process (Linux: reset ``VmHWM``, read it back).

    Elsewhere it falls back to the largest RSS seen at the points :meth:`sample` is called.
    """

    def __init__(self) -> None:
        self.linux = Path("/proc/self/clear_refs").exists()
        self.base_kb = 0
        self.seen_kb = 0

    def __enter__(self) -> PeakMemory:
        if self.linux:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.linux = False
        self.base_kb = _status_kb("VmRSS") if Path("/proc/self/status").exists() else 0
        self.seen_kb = self.base_kb
        return self

    def sample(self) -> None:
        if Path("/proc/self/status").exists():
            self.seen_kb = max(self.seen_kb, _status_kb("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self.sample()
        if self.linux:
            self.seen_kb = max(self.seen_kb, _status_kb("VmHWM"))

    @property
    def peak_mb(self) -> float:
        return max(0, self.seen_kb - self.base_kb) / 1024


def state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- the round ---------------------------------------------------------------------------------


def run_device(job: DeviceJob, state: StateDict | None) -> tuple[DeviceResult, StateDict | None]:
    """Train and evaluate one device for one round. Never raises for the device's own failures:
    they come back as ``status="failed"`` with the reason."""
    profile = load_profile(job.profile)
    plan = profile_resources(profile)
    result = DeviceResult(device=job.device, round=job.round, status=OK)
    result.mem_cap_mb = float(plan.memory_mb)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(plan.torch_threads)))
    try:
        train, b_train = _fetch(job, "train", job.train_ids)
        test, b_test = _fetch(job, "test", job.test_ids)
        if job.first_contact:
            result.bytes_down = b_train + b_test
            result.images_down = len(train) + len(test)
        result.num_examples = len(train)
        feature_mb = (train.features.nbytes + test.features.nbytes) / 2**20
        with PeakMemory() as mem:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            net = build_net(job, state)
            stats = fit(
                net,
                train,
                TrainConfig(
                    epochs=job.epochs,
                    batch_size=job.batch_size,
                    lr=job.lr,
                    seed=job.seed + 1009 * job.device + job.round,
                ),
            )
            mem.sample()
            result.accuracy = float(evaluate(net, test))
            cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        result.train_loss = float(stats.get("loss", float("nan")))
        # CPU time, not wall: other engineers' and other actors' load must not slow the device.
        result.host_compute_s = min(cpu_s, wall_s * max(1, int(plan.torch_threads)))
        result.compute_s = float(compute_seconds(profile, result.host_compute_s))
        result.peak_mem_mb = mem.peak_mb + feature_mb
        new_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        result.bytes_up = state_bytes(new_state)
        result.transfer_s = float(transfer_seconds(profile, result.bytes_down, result.bytes_up))
        if result.peak_mem_mb > plan.memory_mb:
            result.status = FAILED
            result.reason = (
                f"memory: peak {result.peak_mem_mb:.1f} MB > {profile.name} cap "
                f"{plan.memory_mb:.1f} MB"
            )
            result.bytes_up = 0
            return result, None
        return result, new_state
    except Exception as e:  # a device's own failure is data, not a crash of the run
        log.debug("device %d failed:\n%s", job.device, traceback.format_exc())
        result.status = FAILED
        result.reason = f"{type(e).__name__}: {e}"[:500]
        return result, None
    finally:
        torch.set_num_threads(threads)


def evaluate_device(job: DeviceJob, state: StateDict) -> float:
    """Accuracy of the fleet's aggregated weights on this device's test images."""
    test, _ = _fetch(job, "test", job.test_ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(profile_resources(load_profile(job.profile)).torch_threads)))
    try:
        return float(evaluate(build_net(job, state), test))
    finally:
        torch.set_num_threads(threads)
