"""The virtual device clock: what a job would cost on the profiled device.

* Compute: a training run is timed on the host, then scaled by ``host GFLOP/s / device GFLOP/s``
  where the host figure is a calibration of the method's own edge net's training step on the
  same feature shape, batch and micro-batch (:func:`host_gflops`), counted with torch's flop
  counter and timed on this host. The profile's figure is the device's effective rate.
* Transfer: bytes over the profile's downlink/uplink plus one latency per request.
* Threads: :func:`apply_threads` sets torch's thread count from the profile's resource plan.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mist_fed.core.cost import forward_macs
from mist_fed.device.profiles import DeviceProfile, ResourcePlan

log = logging.getLogger(__name__)


def apply_threads(plan: ResourcePlan) -> int:
    """Limit torch to the plan's threads (the device's cores, at most the host's)."""
    torch.set_num_threads(plan.torch_threads)
    return plan.torch_threads


@dataclass(frozen=True)
class HostCalibration:
    step_flops: int  # forward + backward FLOPs of one step
    step_seconds: float  # median host time of one step
    batch: int

    @property
    def gflops(self) -> float:
        return self.step_flops / self.step_seconds / 1e9


def _step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int) -> None:
    for m in range(0, len(x), micro):
        loss = F.cross_entropy(net(x[m : m + micro]), y[m : m + micro])
        loss.backward()


def calibrate_host(
    net: nn.Module,
    feature_shape: tuple[int, ...],
    num_classes: int,
    batch: int = 32,
    micro_batch: int = 0,
    repeats: int = 3,
) -> HostCalibration:
    """Count and time one training step of a copy of ``net`` on random features.

    A step's FLOPs are taken as 3 forward passes' (the backward pass of a matmul costs two),
    2 FLOPs per MAC, with the forward MACs counted by :func:`~mist_fed.core.cost.forward_macs`.
    """
    probe = copy.deepcopy(net).train()
    x = torch.randn(batch, *feature_shape)
    y = torch.randint(0, num_classes, (batch,))
    micro = micro_batch or batch
    flops = 3 * 2 * forward_macs(probe, x)
    _step(probe, x, y, micro)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _step(probe, x, y, micro)
        times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    cal = HostCalibration(step_flops=flops, step_seconds=seconds, batch=batch)
    log.info("host calibration: %.2f GFLOP/s on this edge step", cal.gflops)
    return cal


_CALIBRATIONS: dict[tuple[Any, ...], HostCalibration] = {}


def host_gflops(
    net: nn.Module,
    feature_shape: tuple[int, ...],
    num_classes: int,
    batch: int = 32,
    micro_batch: int = 0,
) -> float:
    """This host's GFLOP/s on ``net``'s own training step (measured once per process and kind).

    Each method's host time is scaled by its own net's rate: a device running a linear head
    and one running an LAE are both timed on what they actually compute.
    """
    params = sum(p.numel() for p in net.parameters())
    threads = torch.get_num_threads()
    key = (type(net).__name__, params, feature_shape, num_classes, batch, micro_batch, threads)
    if key not in _CALIBRATIONS:
        with torch.random.fork_rng(devices=[]):
            _CALIBRATIONS[key] = calibrate_host(net, feature_shape, num_classes, batch, micro_batch)
    return _CALIBRATIONS[key].gflops


@dataclass
class DeviceClock:
    """Accumulates measured host time and the profiled device's simulated time."""

    profile: DeviceProfile
    host_gflops: float | None = None  # None: compute is not scaled (device time = host time)
    time_scale: float = 1.0  # >1 runs the shaped network faster than real time
    compute_host_s: float = 0.0
    compute_device_s: float = 0.0
    transfer_s: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def scale(self, host_seconds: float, host_gflops: float | None = None) -> float:
        """Device seconds for work that took ``host_seconds`` on this host (at ``host_gflops``)."""
        rate = self.host_gflops if host_gflops is None else host_gflops
        if rate is None:
            return host_seconds
        return host_seconds * rate / self.profile.gflops

    def add_compute(
        self, host_seconds: float, what: str = "train", host_gflops: float | None = None
    ) -> float:
        dev = self.scale(host_seconds, host_gflops)
        self.compute_host_s += host_seconds
        self.compute_device_s += dev
        self.events.append({"what": what, "host_s": host_seconds, "device_s": dev})
        return dev

    def add_download(self, nbytes: int, requests: int = 1, what: str = "features") -> float:
        s = self.profile.downlink_seconds(nbytes, requests)
        self.bytes_down += nbytes
        self.transfer_s += s
        self.events.append({"what": what, "bytes": nbytes, "device_s": s})
        return s

    def add_upload(self, nbytes: int, requests: int = 1, what: str = "upload") -> float:
        s = self.profile.uplink_seconds(nbytes, requests)
        self.bytes_up += nbytes
        self.transfer_s += s
        self.events.append({"what": what, "bytes": nbytes, "device_s": s})
        return s

    @property
    def total_device_s(self) -> float:
        return self.compute_device_s + self.transfer_s

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("events")
        d["profile"] = self.profile.name
        d["total_device_s"] = self.total_device_s
        return d
