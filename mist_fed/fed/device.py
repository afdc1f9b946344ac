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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mist_fed.device.clock import DeviceClock, calibrate_host
from mist_fed.device.memory import estimate_train_mb, peak_rss_mb, reset_peak_rss, rss_mb
from mist_fed.device.profiles import load_profile, profile_resources
from mist_fed.device.trainer import TrainConfig, evaluate, fit
from mist_fed.model.backbone import Backbone, BackboneSpec, create_backbone
from mist_fed.core.methods import build_edge_net, method_gather
from mist_fed.wire.client import FeatureClient
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
    backbone: BackboneSpec
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
        d["backbone"] = BackboneSpec(**json.loads(d["backbone"]))
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
    feature_bytes: int = 0
    images_down: int = 0
    accuracy: float = float("nan")
    train_loss: float = float("nan")

    def metrics(self) -> dict[str, float | int]:
        d = dataclasses.asdict(self)
        d.pop("status")
        d.pop("reason")
        return d

    @classmethod
    def from_metrics(cls, status: str, reason: str, m: Any) -> DeviceResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"status", "reason"}
        kw = {k: m[k] for k in names if k in m}
        kw["device"], kw["round"] = int(kw["device"]), int(kw["round"])
        for key in ("bytes_down", "bytes_up", "num_examples", "images_down", "feature_bytes"):
            kw[key] = int(kw.get(key, 0))
        return cls(status=status, reason=reason, **kw)


# -- per-process caches (a Ray actor serves many devices over a run) ---------------------------

_BACKBONES: dict[str, Backbone] = {}
_FEATURES: OrderedDict[tuple[Any, ...], tuple[FeatureSet, int]] = OrderedDict()
_FEATURE_CACHE_BYTES = int(os.environ.get("MIST_FED_WORKER_CACHE_MB", "2048")) << 20


def get_backbone(cfg: BackboneSpec) -> Backbone:
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
    bb = get_backbone(job.backbone)
    net = build_edge_net(
        job.method, bb.geometry, job.num_classes, bb.edge_init_state(job.method)
    )
    if state is not None:
        net.load_state_dict(state)
    return net


def _fetch(job: DeviceJob, split: str, ids: tuple[str, ...]) -> tuple[FeatureSet, int]:
    """Features of ``ids`` and the bytes streamed for them (cached per worker process)."""
    spec = method_gather(job.method, get_backbone(job.backbone).num_blocks, job.k)
    key = (job.cloud, job.task, split, spec.kind, spec.k, job.wire_dtype, ids)
    hit = _FEATURES.get(key)
    if hit is not None:
        _FEATURES.move_to_end(key)
        return hit
    with FeatureClient(job.cloud) as client:
        fs = client.get(job.task, split, spec.kind, spec.k, job.wire_dtype, ids=list(ids))
    nbytes = int(fs.meta.get("wire", {}).get("bytes", fs.features.nbytes))
    _FEATURES[key] = (fs, nbytes)
    while sum(f.features.nbytes for f, _ in _FEATURES.values()) > _FEATURE_CACHE_BYTES:
        _FEATURES.popitem(last=False)
    return fs, nbytes


_CALIBRATION: dict[tuple[Any, ...], float] = {}


def host_gflops(
    job: DeviceJob, net: nn.Module, feature_shape: tuple[int, ...], cfg: TrainConfig
) -> float:
    """This host's GFLOP/s on this edge net's training step (measured once per process)."""
    key = (job.method, feature_shape, job.num_classes, cfg.batch_size, cfg.micro_batch)
    if key not in _CALIBRATION:
        _CALIBRATION[key] = calibrate_host(
            net, feature_shape, job.num_classes, batch=cfg.batch_size, micro_batch=cfg.micro_batch
        ).gflops
    return _CALIBRATION[key]


# -- memory ------------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory this job adds to its worker (the kernel's ``VmHWM``, reset first).

    A worker process hosts many devices in turn, so its runtime and other devices' cached
    features are the baseline, not part of this device's peak.
    """

    def __enter__(self) -> PeakMemory:
        reset_peak_rss()
        self.base_mb = rss_mb()
        self.peak = self.base_mb
        return self

    def sample(self) -> None:
        self.peak = max(self.peak, rss_mb(), peak_rss_mb())

    def __exit__(self, *exc: object) -> None:
        self.sample()

    @property
    def peak_mb(self) -> float:
        return max(0.0, self.peak - self.base_mb)


def state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- the round ---------------------------------------------------------------------------------


def train_config(job: DeviceJob) -> TrainConfig:
    return TrainConfig.for_method(
        job.method,
        epochs=job.epochs,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed + 1009 * job.device + job.round,
    )


def run_device(job: DeviceJob, state: StateDict | None) -> tuple[DeviceResult, StateDict | None]:
    """Train and evaluate one device for one round. Never raises for the device's own failures:
    they come back as ``status="failed"`` with the reason."""
    result = DeviceResult(device=job.device, round=job.round, status=OK)
    threads = torch.get_num_threads()
    try:
        profile = load_profile(job.profile)
        plan = profile_resources(profile)
        result.mem_cap_mb = float(profile.memory_mb)
        torch.set_num_threads(plan.torch_threads)
        clock = DeviceClock(profile)
        if state is not None:
            clock.add_download(state_bytes(state), what="weights")
        train, b_train = _fetch(job, "train", job.train_ids)
        test, b_test = _fetch(job, "test", job.test_ids)
        if job.first_contact:  # the device keeps its features for the later rounds
            clock.add_download(b_train + b_test, requests=2)
            result.feature_bytes = b_train + b_test
            result.images_down = len(train) + len(test)
        result.num_examples = len(train)
        resident_mb = (train.features.nbytes + test.features.nbytes) / 2**20
        cfg = train_config(job)
        net = build_net(job, state)
        clock.host_gflops = host_gflops(job, net, tuple(train.features.shape[1:]), cfg)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            fitted = fit(net, train, cfg, on_step=lambda *_: mem.sample())
            result.accuracy = float(evaluate(net, test))
            host_s = time.perf_counter() - t0
        result.train_loss = fitted.losses[-1] if fitted.losses else float("nan")
        result.host_compute_s = host_s
        clock.add_compute(host_s)
        # A long-lived worker reuses freed pages, which hides allocations from RSS: the
        # measured rise is floored at the trainer's own working-set estimate.
        estimate = estimate_train_mb(
            len(train) + len(test),
            tuple(train.features.shape[1:]),
            train.features.element_size(),
            cfg.micro_batch or cfg.batch_size,
            edge_params=sum(p.numel() for p in net.parameters() if p.requires_grad),
            grad_checkpointing=cfg.grad_checkpointing,
        )
        result.peak_mem_mb = max(mem.peak_mb + resident_mb, estimate)
        if result.peak_mem_mb > profile.memory_mb:
            result.status = FAILED
            result.reason = (
                f"exceeds device memory: peak {result.peak_mem_mb:.1f} MB > "
                f"{profile.name} {profile.memory_mb} MB"
            )
            return _finish(result, clock), None
        new_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        clock.add_upload(state_bytes(new_state), what="weights")
        return _finish(result, clock), new_state
    except Exception as e:  # a device's own failure is data, not a crash of the run
        log.debug("device %d failed:\n%s", job.device, traceback.format_exc())
        result.status = FAILED
        result.reason = f"{type(e).__name__}: {e}"[:500]
        return result, None
    finally:
        torch.set_num_threads(threads)


def _finish(result: DeviceResult, clock: DeviceClock) -> DeviceResult:
    result.bytes_down, result.bytes_up = clock.bytes_down, clock.bytes_up
    result.transfer_s, result.compute_s = clock.transfer_s, clock.compute_device_s
    return result


def evaluate_device(job: DeviceJob, state: StateDict) -> float:
    """Accuracy of the fleet's aggregated weights on this device's test images."""
    test, _ = _fetch(job, "test", job.test_ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(profile_resources(load_profile(job.profile)).torch_threads)
    try:
        return float(evaluate(build_net(job, state), test))
    finally:
        torch.set_num_threads(threads)
