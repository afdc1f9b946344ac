"""Cost model: the Table 1 row of each method, computed from the real modules.

MACs count matmuls, convolutions and attention, as ``torch.utils.flop_counter`` does (MACs =
FLOPs / 2); parameters come from the modules themselves. Edge nets are counted by forward hooks
on their ``Linear``, ``Conv`` and :class:`~mist_fed.core.edge_nets.Attend` modules
(:func:`forward_macs`): torch's flop counter costs about 80 MB of imports, more than a device's
whole training working set, so the edge never imports it. The cloud's MACs
(:func:`mist_fed.cloud.macs.cloud_macs`, timm's modules) use torch's counter, :func:`count_macs`.
Transfer bytes are passed in (the wire's dtypes say what one image costs:
:func:`mist_fed.wire.dtypes.feature_bytes`, exact for the fixed-size dtypes, int4's packed
bytes included; a compressed dtype such as ``int4ch+zstd`` has no predicted cost, its bytes are
measured on the wire).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mist_fed.core.edge_nets import Attend
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
    """Multiply-accumulates of ``fn(*inputs)`` (FLOPs / 2 as counted by torch's flop counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode  # ~80 MB of imports: cloud side only

    counter = FlopCounterMode(display=False)
    # The fused CPU attention kernels are invisible to the counter; the math kernel is not.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn(*inputs)
    return int(counter.get_total_flops()) // 2


def forward_macs(net: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``net(x)``: its Linear, Conv and Attend modules, counted by forward hooks."""
    total = 0

    def hook(m: nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.Conv1d | nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, Attend):
            q, k, v = inputs[:3]
            total += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, Attend)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return total


def net_cost(net: nn.Module, feature_shape: tuple[int, ...]) -> EdgeCost:
    """Parameters and per-image MACs of an edge net on features of ``feature_shape``."""
    was_training = net.training
    net.eval()
    macs = forward_macs(net, torch.zeros(1, *feature_shape))
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
