"""One device's work in one round: an :class:`~mist_fed.device.edge.EdgeDevice`; no Flower, no Ray.

:func:`run_device` opens the job's device: its profile, the cloud as a
:class:`~mist_fed.device.source.FlightSource` (no link shaper: the fleet charges transfer to the
virtual clock only, nothing sleeps) and its own storage directory (``DeviceJob.storage``,
relative: under this process's device-storage root, :func:`~mist_fed.fleet.storage.resolve`). The
device gets its train and test features (pulled into its on-device cache in the round that
first needs them, read from there in every later round: features are paid once), builds its
edge net from the cloud's geometry and the weights it was sent, trains, evaluates, and reports
:class:`~mist_fed.device.edge.DeviceMetrics`, whose names are the columns of
``devices.parquet``. Memory is the device's meter: the peak rise over the job's start (a
worker process hosts many devices in turn) against the profile's cap. A device over its cap,
or failing any other way, is reported ``failed`` with the reason; its weights are not returned.
Workers never build the cloud backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mist_fed.device.edge import DeviceMetrics, EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.device.trainer import ExtraLoss, TrainConfig
from mist_fed.fleet.ray_env import running_ray
from mist_fed.fleet.storage import resolve

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
SourceFactory = Callable[[str], FeatureSource]  # cloud location -> source

OK, FAILED, DROPPED, STRAGGLER = "ok", "failed", "dropped", "straggler"
STATUSES = (OK, FAILED, DROPPED, STRAGGLER)
TEXT_FIELDS = ("status", "reason", "node")  # DeviceResult's text: a reply's ConfigRecord


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
    # The device's own directory (feature cache, initial weights), every round: relative to the
    # device-storage root of whichever node runs the job (fleet/storage.py)
    storage: str
    k: int | None = None
    wire_dtype: str = "float16"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    proximal_mu: float = 0.0  # FedProx: the strategy's proximal term weight (0: none)

    def to_config(self) -> dict[str, Any]:
        """Flat values a Flower ConfigRecord accepts."""
        d = dataclasses.asdict(self)
        d["train_ids"] = list(self.train_ids)
        d["test_ids"] = list(self.test_ids)
        d["k"] = -1 if self.k is None else self.k
        return d

    @classmethod
    def from_config(cls, cfg: Any) -> DeviceJob:
        d = {f.name: cfg[f.name] for f in dataclasses.fields(cls)}
        d["train_ids"] = tuple(d["train_ids"])
        d["test_ids"] = tuple(d["test_ids"])
        d["k"] = None if int(d["k"]) < 0 else int(d["k"])
        return cls(**d)


@dataclass
class DeviceResult:
    """One row of ``devices.parquet`` (before the fleet columns are added).

    After the first fields, the names of :class:`~mist_fed.device.edge.DeviceMetrics`.
    """

    device: int
    round: int
    status: str
    reason: str = ""
    num_examples: int = 0
    accuracy: float = math.nan
    train_loss: float = math.nan
    bytes_down: int = 0
    feature_bytes: int = 0
    init_bytes_down: int = 0
    bytes_up: int = 0
    images_down: int = 0
    requests: int = 0
    transfer_s: float = 0.0
    compute_s: float = 0.0
    host_compute_s: float = 0.0
    train_steps: int = 0
    peak_mem_mb: float = 0.0
    peak_rss_mb: float = 0.0
    mem_cap_mb: float = 0.0
    torch_threads: int = 0
    host_gflops: float = math.nan
    device_gflops: float = 0.0
    edge_params: int = 0
    edge_macs: int = 0
    node: str = ""  # where the job ran: the Ray node's id (see host_node)

    def record(self, metrics: DeviceMetrics) -> DeviceResult:
        """Take the device's measurements (the shared names)."""
        for key, value in metrics.as_dict().items():
            setattr(self, key, value)
        return self

    def metrics(self) -> dict[str, float | int]:
        d = dataclasses.asdict(self)
        for text in TEXT_FIELDS:
            d.pop(text)
        return d

    @classmethod
    def from_metrics(cls, status: str, reason: str, m: Any) -> DeviceResult:
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in TEXT_FIELDS or f.name not in m:
                continue
            kw[f.name] = int(m[f.name]) if isinstance(f.default, int) else float(m[f.name])
        kw["device"], kw["round"] = int(m["device"]), int(m["round"])
        return cls(status=status, reason=reason, **kw)


def state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def train_config(job: DeviceJob) -> TrainConfig:
    return TrainConfig.for_method(
        job.method,
        epochs=job.epochs,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed + 1009 * job.device + job.round - 1,  # device 0, round 1: the seed itself
    )


def proximal_term(anchor: StateDict, mu: float) -> ExtraLoss:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the net's trained parameters."""
    fixed = {k: v.detach().clone().float() for k, v in anchor.items()}

    def term(net: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, p in net.named_parameters():
            if p.requires_grad and name in fixed:
                total = total + (p - fixed[name]).pow(2).sum()
        return 0.5 * mu * total

    return term


def host_node() -> str:
    """Where this process runs: its Ray node's id inside Ray, else the host's name."""
    ray = running_ray()
    if ray is not None:
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


def close_source(source: FeatureSource) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def _device(job: DeviceJob, source: FeatureSource, root: str | Path | None) -> EdgeDevice:
    storage = resolve(job.storage, root)
    # A worker process hosts many devices: the cap covers what this job adds.
    return EdgeDevice(load_profile(job.profile), source, storage, counts_runtime=False)


def run_device(
    job: DeviceJob,
    state: StateDict | None,
    source: SourceFactory = FlightSource,
    root: str | Path | None = None,
) -> tuple[DeviceResult, StateDict | None]:
    """Train and evaluate one device for one round. Never raises for the device's own failures:
    they come back as ``status="failed"`` with the reason. ``source(job.cloud)``: where the
    device's features come from (the cloud's Flight service; a fake in tests); ``root``: the
    device-storage root its storage resolves under (default: this process's)."""
    result = DeviceResult(device=job.device, round=job.round, status=OK, node=host_node())
    device: EdgeDevice | None = None
    new_state: StateDict | None = None
    try:
        src = source(job.cloud)
        try:
            device = _device(job, src, root)
            with device:
                if state is not None:
                    device.download_weights(state_bytes(state))
                train = device.features(
                    job.task, "train", job.method, job.k, job.wire_dtype, ids=job.train_ids
                )
                test = device.features(
                    job.task, "test", job.method, job.k, job.wire_dtype, ids=job.test_ids
                )
                result.num_examples = train.labelled
                net = device.new_net(
                    job.method, job.num_classes, job.k, state=state, wire=job.wire_dtype
                )
                prox = proximal_term(state, job.proximal_mu) if state and job.proximal_mu else None
                fitted = device.train(net, train, train_config(job), extra_loss=prox)
                result.train_loss = fitted.losses[-1] if fitted.losses else math.nan
                result.accuracy = device.evaluate(net, test)
                device.guard.check()  # a device over its cap sends nothing back
                new_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                device.upload_weights(state_bytes(new_state))
        finally:
            close_source(src)
    except Exception as e:  # a device's own failure is data, not a crash of the run
        log.debug("device %d failed:\n%s", job.device, traceback.format_exc())
        result.status = FAILED
        result.reason = f"{type(e).__name__}: {e}"[:500]
        new_state = None
    if device is not None:
        result.record(device.report())
    return result, new_state
