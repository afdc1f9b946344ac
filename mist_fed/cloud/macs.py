"""A method's full Table 1 row: the edge side from :mod:`mist_fed.core.cost`, the cloud's MACs
counted on the backbone itself (one image through the gather the method asks for)."""

from __future__ import annotations

import torch

from mist_fed.cloud.backbone import Backbone
from mist_fed.cloud.gather import gather
from mist_fed.core.cost import MethodCost, count_macs, edge_cost
from mist_fed.core.methods import method_gather


def cloud_macs(backbone: Backbone, method: str, k: int | None = None) -> int:
    """Backbone + gather MACs for one image of ``method``'s features."""
    spec = method_gather(method, backbone.num_blocks, k)
    image = torch.zeros(1, 3, backbone.img_size, backbone.img_size)
    return count_macs(lambda x: gather(backbone, x, spec), image)


def method_cost(
    backbone: Backbone,
    method: str,
    num_classes: int,
    k: int | None = None,
    *,
    bytes_per_image: int,
) -> MethodCost:
    """Transfer bytes (given), edge params and MACs, and cloud MACs of one method on one image."""
    edge = edge_cost(method, backbone.geometry, num_classes, k, backbone.edge_init_state(method))
    return MethodCost(
        **edge.as_dict(),
        transfer_bytes_per_image=bytes_per_image,
        cloud_macs=cloud_macs(backbone, method, k),
    )
