"""TEMPORARY stand-ins for code landing on the cloud and edge branches; replaced on merge."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mist_fed.errors import ConfigError
from mist_fed.wire.features import FeatureSet

_PROFILES = {
    "rpi4": dict(cores=4, memory_mb=4096, slowdown=6.0, down_mbps=50.0, up_mbps=10.0),
    "phone-low": dict(cores=4, memory_mb=2048, slowdown=8.0, down_mbps=10.0, up_mbps=2.0),
    "laptop": dict(cores=8, memory_mb=8192, slowdown=1.0, down_mbps=100.0, up_mbps=20.0),
}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cores: int
    memory_mb: float
    slowdown: float
    down_mbps: float
    up_mbps: float


@dataclass(frozen=True)
class ResourcePlan:
    torch_threads: int
    num_cpus: float
    memory_mb: float


def load_profile(name: str) -> DeviceProfile:
    if name.startswith("tiny-mem"):
        return DeviceProfile(name, 1, 0.001, 1.0, 100.0, 100.0)
    if name not in _PROFILES:
        raise ConfigError(f"unknown profile {name!r}")
    return DeviceProfile(name, **_PROFILES[name])  # type: ignore[arg-type]


def profile_resources(p: DeviceProfile) -> ResourcePlan:
    return ResourcePlan(1, 1.0, p.memory_mb)


def compute_seconds(p: DeviceProfile, host_s: float) -> float:
    return host_s * p.slowdown


def transfer_seconds(p: DeviceProfile, down: int, up: int) -> float:
    return down * 8 / (p.down_mbps * 1e6) + up * 8 / (p.up_mbps * 1e6)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def fit(net: nn.Module, train: FeatureSet, cfg: TrainConfig) -> dict[str, float]:
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    net.train()
    loss = torch.tensor(math.nan)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = train.features[idx].float()
            loss = nn.functional.cross_entropy(net(x), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"loss": float(loss)}


@torch.no_grad()
def evaluate(net: nn.Module, data: FeatureSet) -> float:
    net.eval()
    if len(data) == 0:
        return float("nan")
    pred = net(data.features.float()).argmax(-1)
    return float((pred == data.labels).float().mean())


# -- cloud ------------------------------------------------------------------------------------
_LOCAL: dict[str, Any] = {}


@contextlib.contextmanager
def running_cloud(config: Any) -> Iterator[str]:
    _LOCAL["backbone"] = config
    yield "grpc://127.0.0.1:1"


class FeatureClient:
    def __init__(self, location: str, token: str | None = None) -> None:
        self.location = location
        self.bytes_received = 0

    def get(
        self,
        task: str,
        split: str,
        gather: str,
        k: int | None,
        dtype: str,
        ids: list[str] | None = None,
        *,
        backbone: Any = None,
    ) -> FeatureSet:
        from mist_fed.data import get_task
        from mist_fed.model.gather import GatherSpec
        from mist_fed.model.gather import gather as run_gather

        t = get_task(task)
        s = t.split(split)
        all_ids = list(s.ids)
        pos = {x: i for i, x in enumerate(all_ids)}
        want = ids if ids is not None else all_ids
        tf = backbone.transform()
        imgs = torch.stack([tf(s.image(pos[i])) for i in want])
        feats = run_gather(backbone, imgs, GatherSpec(gather, k)).to(
            torch.float16 if dtype == "float16" else torch.float32
        )
        labels = torch.tensor([s.labels[pos[i]] for i in want], dtype=torch.long)
        self.bytes_received += feats.numel() * feats.element_size()
        return FeatureSet(list(want), labels, feats, {"dtype": dtype})
