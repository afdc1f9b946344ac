"""`mist-fed`: the command line. Each subcommand parses flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mist_fed.errors import MistError

log = logging.getLogger("mist_fed")

Handler = Callable[[argparse.Namespace], int]


def add_backbone_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from mist_fed.defaults import DEFAULT_BACKBONE

    p.add_argument(
        "--backbone",
        default=default or DEFAULT_BACKBONE,
        help="timm ViT name or registered backbone",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="local weights file (.safetensors, .pth, .npz)")
    src.add_argument(
        "--random-init", action="store_true", help="random weights (tests, cost figures)"
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mist_fed.model.backbone import create_backbone
    from mist_fed.model.cost import method_cost
    from mist_fed.model.gather import candidate_ks
    from mist_fed.model.methods import METHODS, PAPER_METHODS

    backbone = create_backbone(args.backbone, weights=args.weights, random_init=args.random_init)
    names = list(METHODS) if args.all else list(PAPER_METHODS)
    costs = {
        m: method_cost(backbone, m, args.num_classes, dtype=args.dtype).as_dict() for m in names
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
            f"{name:<14}{c['transfer_bytes_per_image'] / 1e6:>11.3f} MB{c['edge_params'] / 1e6:>12.3f} M"
            f"{c['edge_macs'] / 1e9:>12.3f} G{c['cloud_macs'] / 1e9:>12.2f} G"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mist-fed", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect", help="each method's Table 1 row: bytes, edge params and MACs, cloud MACs"
    )
    add_backbone_args(p)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"])
    p.add_argument("--all", action="store_true", help="include the ablations")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except MistError as e:
        print(f"mist-fed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
