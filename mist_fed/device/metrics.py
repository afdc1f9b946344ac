"""What a device job reports: its metrics (the columns of every results table), a k selection
and a prediction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mist_fed.device.trainer import FitResult
from mist_fed.errors import ConfigError


@dataclass
class DeviceMetrics:
    """What one device job cost; the column names of every results table."""

    bytes_down: int = 0  # everything downloaded: features, initial weights, fleet weights
    feature_bytes: int = 0  # of which features (paid once: 0 when the cache had them)
    init_bytes_down: int = 0  # of which the method's pretrained initial weights (Partial-1)
    bytes_up: int = 0
    images_down: int = 0  # feature rows downloaded
    requests: int = 0
    transfer_s: float = 0.0  # device seconds on the link (bytes / rate + latency per request)
    compute_s: float = 0.0  # device seconds of compute (host time scaled to the profile)
    host_compute_s: float = 0.0  # host seconds of training and evaluation
    train_steps: int = 0
    peak_mem_mb: float = 0.0  # peak RSS rise over the job's start
    peak_rss_mb: float = 0.0  # peak RSS of the process
    mem_cap_mb: float = 0.0
    torch_threads: int = 0
    host_gflops: float = math.nan  # this host's measured rate on the job's work (FLOPs / host s)
    device_gflops: float = 0.0
    edge_params: int = 0
    edge_macs: int = 0  # per image, forward

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prediction:
    ids: list[str]  # the images the cloud could read, in order
    probs: torch.Tensor  # [len(ids), classes]
    errors: dict[str, str]  # image id -> why the cloud could not read it


def best_k(val_acc: Mapping[int | None, float]) -> int | None:
    """The rule every k selection follows: the best validation accuracy, ties to the smaller k
    (``None``, a method without k, counts as 0)."""
    if not val_acc:
        raise ConfigError("k selection needs at least one candidate k")
    return max(val_acc, key=lambda k: (val_acc[k], -(k or 0)))


@dataclass
class KSelection:
    k: int | None
    val_acc: dict[int | None, float]  # validation accuracy per candidate k
    net: nn.Module  # the net trained at the chosen k
    fit: FitResult  # its training record
