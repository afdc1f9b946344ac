"""`mist-fed bench cloud|edge|sim`: cloud throughput vs bare baselines (and the cloud's numerics
vs plain float32 timm, cold store); edge peak memory vs the paper; simulation overhead vs a
plain loop."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.cloud.numerics import NUMERICS_CHOICES, RUNTIME_CHOICES, RUNTIME_HELP
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
    cold = None
    if not args.no_cold:
        from mist_fed.cloud.bench_numerics import NumericsBenchConfig, bench_numerics

        ncfg = NumericsBenchConfig(
            backbone=args.cold_backbone,
            random_init=args.cold_random_init,
            task=args.task,
            images=args.cold_images,
            reps=args.cold_reps,
            numerics=tuple(args.numerics),
            runtime=args.runtime,
            batch_size=args.forward_batch,
        )
        cold = bench_numerics(ncfg, DEFAULT_HOST)
        r["cold"] = cold
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
    if cold is not None:
        from mist_fed.cloud.bench_numerics import format_numerics

        print("\n".join(format_numerics(cold, args.cold_reps)))
    return 0


def bench_edge(args: Any) -> int:
    from mist_fed.device.bench import bench_edge, report_lines

    r = bench_edge(args.tokens, args.dim, args.batch, steps=args.steps, rows=args.rows)
    print(json.dumps(r, indent=2) if args.json else "\n".join(report_lines(r)))
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
    n = c.add_argument_group("(c) cold-store embedding: the cloud's numerics vs plain float32 timm")
    n.add_argument("--no-cold", action="store_true", help="skip part (c)")
    n.add_argument(
        "--numerics",
        nargs="+",
        choices=NUMERICS_CHOICES,
        default=["auto"],
        help="the service's numerics to measure, each beside float32 timm (default auto)",
    )
    n.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    n.add_argument(
        "--cold-backbone",
        default="dinov2_s14_imgfocus",
        help="backbone of part (c) (default the offline DINOv2-S/14, real weights)",
    )
    n.add_argument("--cold-random-init", action="store_true", help="random weights in (c)")
    n.add_argument("--task", help="task of (c) (default fashion-mnist, else synthetic)")
    n.add_argument(
        "--cold-images",
        type=int,
        default=256,
        help="images per cold stream (default 256: over 32 a cold request's fixed costs weigh "
        "more, 1.53x against 2.08x over 256 on one host, docs/results/bench-cloud-avx512bf16)",
    )
    n.add_argument("--cold-reps", type=int, default=2, help="interleaved rounds (best kept)")
    n.add_argument("--forward-batch", type=int, help="images per forward (default: the service's)")
    c.set_defaults(handler=bench_cloud)
    e = bsub.add_parser("edge", help="peak memory of the EdgeDevice path vs the paper's Pi 4")
    e.add_argument("--tokens", type=int, default=197)
    e.add_argument("--dim", type=int, default=768)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--steps", type=int, default=3, help="steps of the naive loop")
    e.add_argument("--rows", type=int, default=256, help="cached rows the device trains on")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=bench_edge)
    from mist_fed.commands.simulate import add_bench_parser as add_sim

    add_sim(bsub)
