"""A device job and its result: what the server asks of one device in one round, and what comes
back. Plain data, no Flower and no Ray; a transport carries them as it likes
(:mod:`mist_fed.fleet.flower.messages` flattens them into Flower records).

A :class:`DeviceJob` is also what the plan holds for each device (its fleet, task, profile and
share of images, with ``round = 0`` and no cloud or storage yet); a round addresses it
(:meth:`DeviceJob.for_round`). A :class:`DeviceResult` holds the device's
:class:`~mist_fed.device.metrics.DeviceMetrics` as they are, beside what only a fleet knows (status,
examples, accuracy, where it ran); :meth:`DeviceResult.row` is its row of ``devices.parquet``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mist_fed.device.metrics import DeviceMetrics
from mist_fed.fleet.state import register_state_class

StateDict = dict[str, torch.Tensor]

OK, FAILED, DROPPED, STRAGGLER = "ok", "failed", "dropped", "straggler"
register_state_class(DeviceMetrics)  # a result waiting in an asynchronous fleet's queue


@register_state_class
@dataclass(frozen=True)
class DeviceJob:
    """One device's orders for one round (``round = 0``: the device as the plan made it)."""

    device: int
    fleet: str  # the fleet's name: the rounds group devices by it
    task: str
    method: str
    profile: str
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    num_classes: int
    round: int = 0
    cloud: str = ""
    # The device's own directory (feature cache, initial weights), every round: relative to the
    # device-storage root of whichever node runs the job (fleet/storage.py)
    storage: str = ""
    k: int | None = None
    wire_dtype: str = "float16"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    proximal_mu: float = 0.0  # FedProx: the strategy's proximal term weight (0: none)

    def for_round(self, rnd: int, cloud: str, storage: str, **orders: Any) -> DeviceJob:
        """This device's job for round ``rnd`` (``orders``: e.g. that round's ``lr``)."""
        return dataclasses.replace(self, round=rnd, cloud=cloud, storage=storage, **orders)

    def to_config(self) -> dict[str, Any]:
        """Flat values (str, int, float, lists of str): what a Flower ConfigRecord accepts."""
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


@register_state_class
@dataclass
class DeviceResult:
    """What one device job produced: its fleet-level outcome and its device's metrics."""

    device: int
    round: int
    status: str
    reason: str = ""
    num_examples: int = 0
    accuracy: float = math.nan
    train_loss: float = math.nan
    node: str = ""  # where the job ran: a Ray node's id, or the host's name
    metrics: DeviceMetrics = field(default_factory=DeviceMetrics)

    @property
    def device_s(self) -> float:
        """Device seconds the job took on its profile: link plus compute."""
        return self.metrics.transfer_s + self.metrics.compute_s

    def row(self) -> dict[str, Any]:
        """One flat dict: this result's own fields, then :class:`DeviceMetrics`' names."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del own["metrics"]
        return {**own, **self.metrics.as_dict()}

    @classmethod
    def from_row(cls, row: Any) -> DeviceResult:
        """The inverse of :meth:`row` (missing keys keep their defaults; numbers are cast to
        the field's kind, as a transport's records may carry ints as floats)."""
        return cls(**_typed(cls, row), metrics=DeviceMetrics(**_typed(DeviceMetrics, row)))


def _typed(cls: Any, row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in row or f.name == "metrics":
            continue
        value = row[f.name]
        kind = type(f.default) if f.default is not dataclasses.MISSING else None
        if f.name in ("device", "round") or kind is int:
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is str:
            value = str(value)
        out[f.name] = value
    return out


def state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def state_digest(state: StateDict) -> str:
    """A short content hash of a state dict (equal weights, equal digest)."""
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
