"""Flag groups that several subcommands share."""

from __future__ import annotations

import argparse

from mist_fed.assets.defaults import PAPER_BACKBONE


def add_backbone_args(p: argparse.ArgumentParser, default: str = PAPER_BACKBONE) -> None:
    p.add_argument("--backbone", default=default, help="timm ViT name or registered backbone")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="local weights file (.safetensors, .pth, .npz)")
    src.add_argument(
        "--random-init", action="store_true", help="random weights (tests, cost figures)"
    )
