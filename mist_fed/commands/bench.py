"""`mist-fed bench cloud|edge|sim`: cloud throughput vs bare baselines; edge peak memory vs the
paper; simulation overhead vs a plain loop."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mist_fed.defaults import DEFAULT_HOST
from mist_fed.wire.dtypes import WIRE_HELP, wire_arg


def bench_cloud(args: argparse.Namespace) -> int:
    from mist_fed.cloud.bench import BenchConfig
    from mist_fed.cloud.bench import bench_cloud as run

    cfg = BenchConfig(
        backbone=args.backbone,
        images=args.images,
        batch=args.batch,
        reps=args.reps,
        stream_reps=args.stream_reps,
        dtype=args.dtype,
        threads=args.threads,
    )
    r = run(cfg, DEFAULT_HOST)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"{r['backbone']} (random init): {r['blocks']} blocks, {r['tokens']} tokens x {r['dim']}, "
        f"torch threads {r['torch_threads']}; best of {cfg.stream_reps} streams / {cfg.reps} passes"
    )
    print(
        f"(a) do_get {r['stream_bytes'] / 1e6:.1f} MB ({cfg.images} images, {cfg.dtype}, warm store): "
        f"ours {r['ours_bytes_per_s'] / 1e6:.0f} MB/s vs bare pyarrow.flight "
        f"{r['bare_bytes_per_s'] / 1e6:.0f} MB/s -> ratio {r['stream_ratio']:.2f} "
        f"(median {r['stream_ratio_median']:.2f}; target >= 0.8)"
    )
    print(
        f"(b) embed batch {cfg.batch}: backbone + Gather* (all candidate k, one pass) "
        f"{r['ours_images_per_s']:.1f} img/s vs timm forward_features "
        f"{r['timm_images_per_s']:.1f} img/s -> ratio {r['embed_ratio']:.2f} (target >= 0.9)"
    )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks against bare baselines")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    c = bsub.add_parser("cloud", help="feature server bytes/s and embedder images/s vs baselines")
    c.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT (random init)")
    c.add_argument("--images", type=int, default=64, help="rows per do_get stream")
    c.add_argument("--batch", type=int, default=16, help="images per forward pass")
    c.add_argument("--reps", type=int, default=5, help="forward passes per side (best kept)")
    c.add_argument(
        "--stream-reps", type=int, default=40, help="do_get streams per side (best kept)"
    )
    c.add_argument("--dtype", default="float32", type=wire_arg, help=WIRE_HELP)
    c.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(handler=bench_cloud)
    from mist_fed.device.bench import add_parser as add_edge

    add_edge(bsub)
    from mist_fed.commands.simulate import add_bench_parser as add_sim

    add_sim(bsub)
