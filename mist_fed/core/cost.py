"""Cost model: the Table 1 row of each method, computed from the real modules.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image (matmuls,
convolutions and attention; MACs = FLOPs / 2), parameters from the modules themselves. The
edge side needs only the cloud's :class:`~mist_fed.core.specs.Geometry`; the cloud side's MACs
are counted by the caller that has the backbone (:func:`mist_fed.model.gather.cloud_macs`), and
transfer bytes are passed in (the wire's dtypes say what one image costs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mist_fed.core.methods import build_edge_net, method_gather
from mist_fed.core.specs import Geometry


@dataclass(frozen=True)
class EdgeCost:
    edge_params: int  # trainable parameters of the edge net
    edge_block_params: int  # of which in its blocks (the paper's count)
    edge_macs: int  # per image, forward

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class MethodCost(EdgeCost):
    transfer_bytes_per_image: int = 0
    cloud_macs: int = 0


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_macs(fn: Any, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of ``fn(*inputs)`` (FLOPs / 2 as counted by torch)."""
    counter = FlopCounterMode(display=False)
    # The fused CPU attention kernels are invisible to the counter; the math kernel is not.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn(*inputs)
    return int(counter.get_total_flops()) // 2


def net_cost(net: nn.Module, feature_shape: tuple[int, ...]) -> EdgeCost:
    """Parameters and per-image MACs of an edge net on features of ``feature_shape``."""
    was_training = net.training
    net.eval()
    macs = count_macs(net, torch.zeros(1, *feature_shape))
    net.train(was_training)
    blocks = (
        getattr(net, "blocks", None) or getattr(net, "levels", None) or getattr(net, "block", None)
    )
    return EdgeCost(
        edge_params=count_params(net),
        edge_block_params=count_params(blocks) if isinstance(blocks, nn.Module) else 0,
        edge_macs=macs,
    )


def edge_cost(
    method: str,
    geometry: Geometry,
    num_classes: int,
    k: int | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> EdgeCost:
    """The edge net's parameters and MACs for ``method`` on the cloud's ``geometry``."""
    shape = geometry.shape(method_gather(method, geometry.num_blocks, k))
    return net_cost(build_edge_net(method, geometry, num_classes, init), shape)
