"""`mist-fed inspect`: each method's Table 1 row (transfer bytes, edge params and MACs, cloud MACs)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mist_fed.commands.common import add_backbone_args
from mist_fed.wire.dtypes import FIXED_SIZE


def run(args: argparse.Namespace) -> int:
    from mist_fed.cloud.backbone import create_backbone
    from mist_fed.cloud.macs import method_cost
    from mist_fed.core.methods import METHODS, PAPER_METHODS, method_gather
    from mist_fed.core.specs import candidate_ks
    from mist_fed.wire.dtypes import feature_bytes

    backbone = create_backbone(args.backbone, weights=args.weights, random_init=args.random_init)
    names = list(METHODS) if args.all else list(PAPER_METHODS)

    def nbytes(method: str) -> int:
        spec = method_gather(method, backbone.num_blocks)
        return feature_bytes(backbone.geometry.shape(spec), args.dtype)

    costs = {
        m: method_cost(backbone, m, args.num_classes, bytes_per_image=nbytes(m)).as_dict()
        for m in names
    }
    report: dict[str, Any] = {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "blocks": backbone.num_blocks,
        "tokens": backbone.num_tokens,
        "dim": backbone.embed_dim,
        "candidate_k": list(candidate_ks(backbone.num_blocks)),
        "num_classes": args.num_classes,
        "dtype": args.dtype,
        "methods": costs,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{backbone.name} ({backbone.weights_id}): N={backbone.num_blocks} blocks, "
        f"{backbone.num_tokens} tokens x {backbone.embed_dim}, candidate k {report['candidate_k']}"
    )
    header = (
        f"{'method':<14}{'transfer/img':>14}{'edge params':>14}{'edge MACs':>14}{'cloud MACs':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, c in costs.items():
        print(
            f"{name:<14}{c['transfer_bytes_per_image'] / 1e6:>11.3f} MB"
            f"{c['edge_params'] / 1e6:>12.3f} M{c['edge_macs'] / 1e9:>12.3f} G"
            f"{c['cloud_macs'] / 1e9:>12.2f} G"
        )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="each method's Table 1 row: bytes, edge params and MACs, cloud MACs"
    )
    add_backbone_args(p)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=FIXED_SIZE,
        help="wire dtype (compressed ones have no predicted size: they are measured)",
    )
    p.add_argument("--all", action="store_true", help="include the ablations")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)
