"""The separated-tuning methods: which gather the cloud runs and which network the edge trains.

Each method pairs a :class:`GatherSpec` (a function of the backbone depth ``N`` and an optional
``k``) with a registered edge network. The paper's comparisons and MIST's ablations are rows here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mist_fed.core.edge_nets import create_edge_net
from mist_fed.core.specs import GatherSpec, Geometry
from mist_fed.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    gather: Callable[[int, int | None], GatherSpec]  # (N, k or None) -> spec
    edge: str
    edge_kwargs: dict[str, Any] = field(default_factory=dict)
    tunes_k: bool = False  # k is chosen per task from the candidate set


def _mist(n: int, k: int | None) -> GatherSpec:
    return GatherSpec("mist", n if k is None else k)


def _mist_pooled(n: int, k: int | None) -> GatherSpec:
    return GatherSpec("mistpool", n if k is None else k)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            "linear probing on the final normed class token",
            lambda n, k: GatherSpec("final"),
            "linear",
        ),
        Method(
            "partial1",
            "Partial-1: last block tuned on the edge, input z_{N-1}",
            lambda n, k: GatherSpec("block", n - 1),
            "partial1",
        ),
        Method(
            "side",
            "LAST-style side tuning on all block outputs [z_0..z_N]",
            lambda n, k: GatherSpec("side"),
            "side",
        ),
        Method("mist", "MIST: LAE on Gather* = z_0 + ... + z_k", _mist, "lae", tunes_k=True),
        Method(
            "gather_linear", "ablation: Gather* + linear head", _mist, "gather_linear", tunes_k=True
        ),
        Method(
            "mist_pool",
            "wire: MIST with the patch grid average-pooled 2x2 on the cloud (1/4 of the tokens)",
            _mist_pooled,
            "lae",
            tunes_k=True,
        ),
        Method("lae_zn", "ablation: LAE on z_N only", lambda n, k: GatherSpec("block", n), "lae"),
        Method(
            "mist_mlp",
            "ablation: MIST with MLP edge blocks",
            _mist,
            "lae",
            {"block": "mlp"},
            tunes_k=True,
        ),
        Method(
            "mist_dwconv",
            "ablation: MIST with depthwise-conv edge blocks",
            _mist,
            "lae",
            {"block": "dwconv"},
            tunes_k=True,
        ),
    )
}

PAPER_METHODS = ("linear", "partial1", "side", "mist")
#: edge nets that read a [tokens, channels] map of any width: a projected wire can feed them
PROJECTABLE_EDGES = ("lae", "gather_linear")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_gather(name: str, num_blocks: int, k: int | None = None) -> GatherSpec:
    """The gather spec a method asks the cloud for, on a backbone of ``num_blocks`` blocks."""
    return get_method(name).gather(num_blocks, k)


def starts_from_backbone(name: str) -> bool:
    """Whether the method's edge net starts from pretrained backbone weights (Partial-1)."""
    return get_method(name).edge == "partial1"


def build_edge_net(
    name: str,
    geometry: Geometry,
    num_classes: int,
    init: Mapping[str, torch.Tensor] | None = None,
    *,
    projection: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """The edge network a method trains, sized from the cloud's ``geometry``.

    ``projection``: the features arrive projected to this many channels per token (a
    ``pca<D>-`` wire's ``D``, :func:`mist_fed.wire.dtypes.parse_wire`), not the backbone's own.

    ``init``: the pretrained weights it starts from (Partial-1's last block and final norm, as
    the cloud's ``edge_init`` serves them, or a checkpoint's state); required where
    :func:`starts_from_backbone`.
    """
    method = get_method(name)
    shape = geometry.shape(method.gather(geometry.num_blocks, None))
    if projection is not None:
        if method.edge not in PROJECTABLE_EDGES or len(shape) != 2:
            fits = [m.name for m in METHODS.values() if m.edge in PROJECTABLE_EDGES]
            raise ConfigError(
                f"{name} needs the backbone's own {geometry.embed_dim} channels, not a "
                f"projection: a projected wire is for {', '.join(fits)}"
            )
        if not 1 <= projection <= geometry.embed_dim:
            raise ConfigError(
                f"a projection to {projection} channels needs 1..{geometry.embed_dim} "
                f"(the width of {geometry.backbone})"
            )
    kw: dict[str, Any] = {
        "dim": projection or geometry.embed_dim,
        "tokens": shape[-2] if len(shape) > 1 else geometry.num_tokens,
        "num_classes": num_classes,
        "prefix_tokens": geometry.num_prefix_tokens,
        **method.edge_kwargs,
        **overrides,
    }
    if method.edge == "side":
        kw["levels"] = geometry.num_blocks + 1
    if starts_from_backbone(name):
        if not init:
            raise ConfigError(
                f"{name} starts from the backbone's pretrained weights of {geometry.backbone}; "
                "pass them as init (the cloud's edge_init, FeatureClient.edge_init)"
            )
        kw.update(init=init, num_heads=geometry.num_heads)
    return create_edge_net(method.edge, **kw)
