"""Edge checkpoints: the trained edge network as ``safetensors`` plus its config as JSON.

``DIR/lae.safetensors`` holds the weights (the config is also embedded in its metadata) and
``DIR/lae.json`` the :class:`EdgeModelConfig`, enough to rebuild the network without the
cloud: method, feature shape, classes, and the backbone/gather it was trained on (a client
uses them to ask the cloud for the same features at inference time).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mist_fed.core.methods import build_edge_net, get_method, starts_from_backbone
from mist_fed.core.specs import Geometry
from mist_fed.errors import ConfigError
from mist_fed.wire.dtypes import wire_projection

WEIGHTS_FILE = "lae.safetensors"
CONFIG_FILE = "lae.json"
FORMAT_VERSION = 2  # 2: the backbone as the cloud's geometry


@dataclass(frozen=True)
class EdgeModelConfig:
    method: str
    num_classes: int
    geometry: Geometry  # the cloud backbone the features came from
    gather: str = "mist"  # gather kind
    k: int | None = None
    dtype: str = "float32"  # wire dtype it was trained on
    basis: str = ""  # a projected wire's projection id: features of another basis are refused
    classes: list[str] = field(default_factory=list)
    task: str = ""
    edge_kwargs: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if isinstance(self.geometry, dict):
            object.__setattr__(self, "geometry", Geometry.from_dict(self.geometry))

    @property
    def backbone(self) -> str:
        return self.geometry.backbone

    @property
    def weights_id(self) -> str:
        return self.geometry.weights

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EdgeModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"edge model config has unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def build_net(cfg: EdgeModelConfig, init: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A fresh edge network for ``cfg``, with the ``init`` weights loaded if given.

    Partial-1 starts from the backbone's pretrained last block and final norm: ``init`` (the
    cloud's ``edge_init`` weights, or a checkpoint's state) must hold them.
    """
    init = dict(init) if init else None
    partial = init if starts_from_backbone(cfg.method) else None
    net = build_edge_net(
        cfg.method,
        cfg.geometry,
        cfg.num_classes,
        partial,
        projection=wire_projection(cfg.dtype),
        **cfg.edge_kwargs,
    )
    if init:
        _load_init(net, init)
    return net


def _load_init(net: nn.Module, init: Mapping[str, torch.Tensor]) -> None:
    try:
        _, unexpected = net.load_state_dict(dict(init), strict=False)
    except RuntimeError as e:
        raise ConfigError(f"initial edge weights do not fit this edge network: {e}") from e
    if unexpected:
        raise ConfigError(
            f"initial edge weights have {len(unexpected)} keys this edge network lacks "
            f"(e.g. {unexpected[:3]}); were they made for another method or backbone?"
        )


def save_checkpoint(net: nn.Module, cfg: EdgeModelConfig, out_dir: str | Path) -> Path:
    """Write ``lae.safetensors`` and ``lae.json`` under ``out_dir``; returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(asdict(cfg), sort_keys=True)  # geometry: a nested dict
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    path = out / WEIGHTS_FILE
    save_file(state, str(path), metadata={"mist_fed.config": meta})
    (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(model_dir: str | Path) -> tuple[nn.Module, EdgeModelConfig]:
    """Rebuild a saved edge network (eval mode) and its config."""
    d = Path(model_dir)
    wpath, cpath = d / WEIGHTS_FILE, d / CONFIG_FILE
    if not wpath.is_file() or not cpath.is_file():
        raise ConfigError(
            f"{d} is not an edge model directory (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "train one with `mist-fed client --out DIR`"
        )
    data = json.loads(cpath.read_text())
    if data.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{cpath}: format version {data.get('version')}, expected {FORMAT_VERSION}; "
            "retrain it with this version's `mist-fed client`"
        )
    cfg = EdgeModelConfig.from_dict(data)
    try:
        state = load_file(str(wpath))  # safetensors only: nothing is unpickled
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"{wpath} is not a readable safetensors file ({e}); save models with "
            "`mist-fed client --out DIR` (pickled .pt/.pth checkpoints are not loaded)"
        ) from e
    try:
        net = build_net(cfg, init=state)
        net.load_state_dict(state)
    except (ConfigError, RuntimeError) as e:
        raise ConfigError(f"{wpath} does not match its config {cpath}: {e}") from e
    return net.eval(), cfg
