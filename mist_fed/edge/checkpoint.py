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

from mist_fed.errors import ConfigError
from mist_fed.model.backbone import Backbone
from mist_fed.model.lae import create_edge_net
from mist_fed.model.methods import build_edge_net, get_method

WEIGHTS_FILE = "lae.safetensors"
CONFIG_FILE = "lae.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EdgeModelConfig:
    method: str
    num_classes: int
    backbone: str  # backbone name the features came from
    weights_id: str  # the cloud backbone's weights id
    num_blocks: int
    tokens: int
    dim: int
    prefix_tokens: int = 1
    gather: str = "mist"  # gather kind
    k: int | None = None
    dtype: str = "float32"  # wire dtype it was trained on
    classes: list[str] = field(default_factory=list)
    task: str = ""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    edge_kwargs: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EdgeModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"edge model config has unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def for_backbone(
        cls, method: str, backbone: Backbone, num_classes: int, **kw: Any
    ) -> EdgeModelConfig:
        return cls(
            method=method,
            num_classes=num_classes,
            backbone=backbone.name,
            weights_id=backbone.weights_id,
            num_blocks=backbone.num_blocks,
            tokens=backbone.num_tokens,
            dim=backbone.embed_dim,
            prefix_tokens=backbone.num_prefix_tokens,
            backbone_kwargs=dict(backbone.spec.model_kwargs),
            **kw,
        )


def build_net(
    cfg: EdgeModelConfig,
    backbone: Backbone | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A fresh edge network for ``cfg``, with the ``init`` weights loaded if given.

    Partial-1 starts from the backbone's pretrained last block and final norm: from
    ``backbone`` if at hand, else from ``init`` (the cloud's ``edge_init`` weights, or a
    checkpoint's state). Without a backbone its block is built on the meta device, for shapes
    only (no random backbone is made), and ``init`` must fill it.
    """
    method = get_method(cfg.method)
    if method.edge == "partial1":
        if backbone is not None:
            net = build_edge_net(cfg.method, backbone, cfg.num_classes, **cfg.edge_kwargs)
        else:
            net = _partial1_from_shapes(cfg, init)
    else:
        kw: dict[str, Any] = {
            "dim": cfg.dim,
            "tokens": cfg.tokens,
            "num_classes": cfg.num_classes,
            "prefix_tokens": cfg.prefix_tokens,
            **method.edge_kwargs,
            **cfg.edge_kwargs,
        }
        if method.edge == "side":
            kw["levels"] = cfg.num_blocks + 1
        net = create_edge_net(method.edge, **kw)
    if init:
        _load_init(net, init)
    return net


def _partial1_from_shapes(
    cfg: EdgeModelConfig, init: Mapping[str, torch.Tensor] | None
) -> nn.Module:
    """A Partial-1 net whose block and norm are empty CPU tensors, to be filled by ``init``."""
    from mist_fed.model.backbone import create_backbone

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no reseed, no memory
        skeleton = create_backbone(cfg.backbone, random_init=True, **cfg.backbone_kwargs)
    net = build_edge_net(cfg.method, skeleton, cfg.num_classes, **cfg.edge_kwargs)
    on_meta = [k for k, v in [*net.named_parameters(), *net.named_buffers()] if v.is_meta]
    uncovered = sorted(set(on_meta) - set(init or {}))
    if uncovered:
        raise ConfigError(
            f"Partial-1 starts from the pretrained last block of {cfg.backbone}, but no weights "
            f"were given for {len(uncovered)} of its tensors (e.g. {uncovered[:3]}); pass the "
            "backbone, or the cloud's edge_init weights (FeatureClient.edge_init)"
        )
    real = {k: v.clone() for k, v in net.state_dict().items() if not v.is_meta}  # the new head
    net.to_empty(device="cpu")
    net.load_state_dict(real, strict=False)
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
    meta = json.dumps(asdict(cfg), sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    path = out / WEIGHTS_FILE
    save_file(state, str(path), metadata={"mist_fed.config": meta})
    (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(
    model_dir: str | Path, backbone: Backbone | None = None
) -> tuple[nn.Module, EdgeModelConfig]:
    """Rebuild a saved edge network (eval mode) and its config."""
    d = Path(model_dir)
    wpath, cpath = d / WEIGHTS_FILE, d / CONFIG_FILE
    if not wpath.is_file() or not cpath.is_file():
        raise ConfigError(
            f"{d} is not an edge model directory (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "train one with `mist-fed client --out DIR`"
        )
    cfg = EdgeModelConfig.from_dict(json.loads(cpath.read_text()))
    if cfg.version != FORMAT_VERSION:
        raise ConfigError(f"{cpath}: format version {cfg.version}, expected {FORMAT_VERSION}")
    try:
        state = load_file(str(wpath))  # safetensors only: nothing is unpickled
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"{wpath} is not a readable safetensors file ({e}); save models with "
            "`mist-fed client --out DIR` (pickled .pt/.pth checkpoints are not loaded)"
        ) from e
    try:
        net = build_net(cfg, backbone, init=state)  # Partial-1: shapes only, state fills it
        net.load_state_dict(state)
    except (ConfigError, RuntimeError) as e:
        raise ConfigError(f"{wpath} does not match its config {cpath}: {e}") from e
    return net.eval(), cfg
