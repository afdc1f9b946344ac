"""A comparison's result row: what one device job measured, and how a stopped run's rows are
read back (``--resume``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mist_fed.device.metrics import DeviceMetrics


@dataclass
class RowResult:
    label: str
    method: str
    wire_dtype: str
    task: str
    seed: int
    group: str
    k: int | None
    accuracy: float
    val_accuracy: float
    bytes_per_image: float
    cloud_macs: int
    profile: str
    device: DeviceMetrics
    shots: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "device"}
        return d | self.device.as_dict()

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RowResult:
        """The inverse of :meth:`as_dict`, for a row read back from ``compare.parquet`` (where
        a missing ``k`` or ``shots`` is NaN)."""

        def opt_int(v: Any) -> int | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)

        mine = {f.name for f in fields(cls)} - {"device"}
        metrics = DeviceMetrics(**{f.name: row[f.name] for f in fields(DeviceMetrics)})
        kw: dict[str, Any] = {k: row.get(k) for k in mine} | {
            "k": opt_int(row["k"]),
            "shots": opt_int(row.get("shots")),
            "seed": int(row["seed"]),
        }
        return cls(**kw, device=metrics)
