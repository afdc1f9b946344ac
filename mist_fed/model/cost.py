"""Cost model: the Table 1 row of each method, computed from the real modules.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image (matmuls,
convolutions and attention; MACs = FLOPs / 2), parameters from the modules themselves,
and transfer bytes from the gathered feature's shape and the wire dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mist_fed.model.backbone import Backbone
from mist_fed.model.gather import feature_shape, gather
from mist_fed.model.methods import build_edge_net, method_gather
from mist_fed.wire.dtypes import feature_bytes


@dataclass(frozen=True)
class MethodCost:
    transfer_bytes_per_image: int
    edge_params: int
    edge_block_params: int
    edge_macs: int
    cloud_macs: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_macs(fn: Any, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of ``fn(*inputs)`` (FLOPs / 2 as counted by torch)."""
    counter = FlopCounterMode(display=False)
    # The fused CPU attention kernels are invisible to the counter; the math kernel is not.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn(*inputs)
    return int(counter.get_total_flops()) // 2


def method_cost(
    backbone: Backbone, method: str, num_classes: int, k: int | None = None, dtype: str = "float32"
) -> MethodCost:
    """Transfer bytes, edge params and MACs, and cloud MACs of one method on one image."""
    spec = method_gather(method, backbone, k)
    size = backbone.img_size
    image = torch.zeros(1, 3, size, size)
    cloud_macs = count_macs(lambda x: gather(backbone, x, spec), image)
    shape = feature_shape(backbone, spec)
    net = build_edge_net(method, backbone, num_classes).eval()
    edge_macs = count_macs(net, torch.zeros(1, *shape))
    blocks = (
        getattr(net, "blocks", None) or getattr(net, "levels", None) or getattr(net, "block", None)
    )
    return MethodCost(
        transfer_bytes_per_image=feature_bytes(shape, dtype),
        edge_params=count_params(net),
        edge_block_params=count_params(blocks) if blocks is not None else 0,
        edge_macs=edge_macs,
        cloud_macs=cloud_macs,
    )
