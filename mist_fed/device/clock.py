"""The virtual device clock: what a job would cost on the profiled device.

* Compute: the work a job does, counted in FLOPs of its own edge net (forward MACs per image
  from :func:`~mist_fed.core.cost.forward_macs`, x2 FLOPs per MAC, x3 for a training step: the
  backward pass of a matmul costs two forwards), divided by the profile's effective GFLOP/s.
  This host's time is measured beside it (``compute_host_s``), but the device's time does not
  depend on how fast or how loaded this host is: the same job always costs the same device
  seconds, whichever entry point or worker ran it.
* Transfer: bytes over the profile's downlink/uplink plus one latency per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from mist_fed.device.profiles import DeviceProfile

TRAIN_FLOPS_PER_MAC = 6  # forward + backward (2x the forward), 2 FLOPs per MAC
EVAL_FLOPS_PER_MAC = 2


@dataclass
class DeviceClock:
    """Accumulates the profiled device's simulated time, and the host time measured beside it."""

    profile: DeviceProfile
    compute_host_s: float = 0.0
    compute_device_s: float = 0.0
    flops: int = 0
    transfer_s: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0

    def device_seconds(self, flops: float) -> float:
        """Seconds the profiled device takes for ``flops`` floating-point operations."""
        return flops / (self.profile.gflops * 1e9)

    def add_compute(self, host_seconds: float, flops: int) -> float:
        """Work of ``flops`` that took ``host_seconds`` here; returns the device's seconds."""
        dev = self.device_seconds(flops)
        self.compute_host_s += host_seconds
        self.compute_device_s += dev
        self.flops += flops
        return dev

    @property
    def host_gflops(self) -> float:
        """This host's measured rate on the same work (NaN before any)."""
        return self.flops / self.compute_host_s / 1e9 if self.compute_host_s else float("nan")

    def add_download(self, nbytes: int, requests: int = 1) -> float:
        s = self.profile.downlink_seconds(nbytes, requests)
        self.bytes_down += nbytes
        self.transfer_s += s
        return s

    def add_upload(self, nbytes: int, requests: int = 1) -> float:
        s = self.profile.uplink_seconds(nbytes, requests)
        self.bytes_up += nbytes
        self.transfer_s += s
        return s

    @property
    def total_device_s(self) -> float:
        return self.compute_device_s + self.transfer_s
