"""One device's work in one round, and the in-process transport; no Flower, no Ray.

:func:`run_device` opens the job's device, an :class:`~mist_fed.device.edge.EdgeDevice`: its
profile, the cloud as a :class:`~mist_fed.device.source.FlightSource` (no link shaper: the fleet
charges transfer to the virtual clock only, nothing sleeps) and its own storage directory
(``DeviceJob.storage``, relative: under this process's device-storage root,
:func:`~mist_fed.fleet.storage.resolve`). The device gets its train and test features (pulled
into its on-device cache in the round that first needs them, read from there in every later
round: features are paid once), builds its edge net from the cloud's geometry and the weights
it was sent, trains, evaluates, and reports its :class:`~mist_fed.device.metrics.DeviceMetrics`.
Memory is the device's meter: the peak rise over the job's start (a worker process hosts many
devices in turn) against the profile's cap. A device over its cap, or failing any other way, is
reported ``failed`` with the reason; its weights are not returned. Workers never build the
cloud backbone.

:class:`LocalTransport` runs each job with :func:`run_device` in this process, one after
another: the plain loop (the overhead benchmark's baseline, the sweeps, tests).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.device.trainer import ExtraLoss, TrainConfig
from mist_fed.fleet.job import FAILED, OK, DeviceJob, DeviceResult, StateDict, state_bytes
from mist_fed.fleet.storage import resolve
from mist_fed.fleet.transport import Reply, RunStopped

log = logging.getLogger(__name__)

# (cloud location, *, faults=the device's link faults, seed=their draws) -> source
SourceFactory = Callable[..., FeatureSource]


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


def close_source(source: FeatureSource) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def run_device(
    job: DeviceJob,
    state: StateDict | None,
    source: SourceFactory = FlightSource,
    root: str | Path | None = None,
    node: str | None = None,
) -> tuple[DeviceResult, StateDict | None]:
    """Train and evaluate one device for one round. Never raises for the device's own failures:
    they come back as ``status="failed"`` with the reason. ``source(job.cloud)``: where the
    device's features come from (the cloud's Flight service, over the link its profile names;
    a fake in tests); ``root``: the
    device-storage root its storage resolves under (default: this process's); ``node``: where
    it runs (default: this host's name)."""
    result = DeviceResult(job.device, job.round, OK, node=node or socket.gethostname())
    device: EdgeDevice | None = None
    new_state: StateDict | None = None
    try:
        profile = load_profile(job.profile)
        # the device's link, as unreliable as its profile says, drawn per device and round
        src = source(job.cloud, faults=profile.link_faults(), seed=train_config(job).seed)
        try:
            # A worker process hosts many devices: the cap covers what this job adds.
            device = EdgeDevice(profile, src, resolve(job.storage, root), counts_runtime=False)
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
        result.metrics = device.report()
    return result, new_state


class LocalTransport:
    """Every job in this process, in turn, through :func:`run_device` (storage under this
    process's root, where :func:`~mist_fed.fleet.storage.device_storage` made the run's).

    ``stop``, once set, ends the round between two jobs with
    :class:`~mist_fed.fleet.transport.RunStopped`."""

    def __init__(
        self,
        source: SourceFactory = FlightSource,
        root: str | Path | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.root = root
        self.stop = stop
        self._todo: deque[tuple[DeviceJob, StateDict]] = deque()

    def submit(self, jobs: Sequence[tuple[DeviceJob, StateDict]]) -> None:
        self._todo.extend(jobs)

    def replies(self) -> Iterator[Reply]:
        """Jobs submitted while this runs are run too; closing it drops the jobs not run."""
        try:
            while self._todo:
                if self.stop is not None and self.stop.is_set():
                    raise RunStopped("the fleet run was stopped")
                job, state = self._todo.popleft()
                yield run_device(job, state, self.source, self.root)
        finally:
            self._todo.clear()
