"""`mist-fed client`: one edge device: pull features, train the edge net, evaluate, save.

``mist-fed client predict --model DIR --cloud URL IMAGE...`` classifies local images with a
saved model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from mist_fed.assets.defaults import (
    DEFAULT_PROFILE,
    STUDIED_METHOD,
    STUDIED_WIRE,
    STUDIED_WIRE_SOURCE,
    cloud_location,
)
from mist_fed.wire.dtypes import WIRE_HELP, wire_arg

TOKEN_ENV = "MIST_FED_TOKEN"
RUNS_DIR = Path("runs")


def default_out(task: str, method: str, now: float | None = None) -> Path:
    """``runs/<task>-<method>-<time>/``: where a client run writes when no ``--out`` is given."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return RUNS_DIR / f"{safe}-{method}-{stamp}"


def run(args: argparse.Namespace) -> int:
    from mist_fed.assets.defaults import default_task
    from mist_fed.device.client import ClientConfig, run_client
    from mist_fed.device.trainer import TrainConfig, with_overrides

    task = args.task or default_task()
    out = str(args.out or default_out(task, args.method))
    train = with_overrides(
        TrainConfig.for_method(args.method),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        seed=args.seed,
    )
    cfg = ClientConfig(
        task=task,
        cloud=args.cloud,
        profile=args.profile,
        out=out,
        method=args.method,
        dtype=args.dtype,  # None: the studied wire where the cloud's backbone fits it
        token=args.token or os.environ.get(TOKEN_ENV),
        ks=tuple(int(k) for k in args.k.split(",")) if args.k else None,
        upload=args.upload,
        time_scale=args.time_scale,
        hard_memory_limit=not args.no_hard_memory_limit,
        device_dir=args.device_dir,
        progress=sys.stderr.isatty(),
        train=train,
    )
    if not cfg.progress:  # no terminal: a stream's progress as a log line every 30 s
        logging.getLogger("mist_fed.wire.progress").setLevel(logging.INFO)
    m = run_client(cfg)
    if args.json:
        print(json.dumps(m, indent=2))
        print(f"wrote {out}/lae.safetensors and {out}/metrics.json", file=sys.stderr)
        return 0
    print(
        f"{m['task']} / {m['method']} / {m['dtype']} on {m['profile']['name']}: test accuracy {m['accuracy']:.4f} "
        f"(k={m['k']}, val {m['val_accuracy']})\n"
        f"  down {m['bytes_down'] / 1e6:.2f} MB ({m['feature_bytes'] / 1e6:.2f} MB of features; "
        f"the device cache in {m['device_dir']} had the rest), up {m['bytes_up'] / 1e6:.2f} MB, "
        f"transfer {m['transfer_s']:.1f} s on the device link "
        f"(waited {m['transfer_wait_s']:.1f} s at time scale {m['time_scale']:g})\n"
        f"  compute {m['host_compute_s']:.1f} s here, {m['compute_s']:.1f} s on the device; "
        f"peak RSS {m['peak_rss_mb']:.0f} MB of {m['mem_cap_mb']:.0f} MB; "
        f"{m['edge_params']} edge params\n"
        f"  wrote {out}/lae.safetensors and {out}/metrics.json"
    )
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from mist_fed.device.client import predict_images
    from mist_fed.device.profiles import load_profile

    profile = load_profile(args.profile)
    token = args.token or os.environ.get(TOKEN_ENV)
    results = predict_images(args.model, args.cloud, args.images, token, args.top, profile)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if "error" in r:
            print(f"{r['image']}: error: {r['error']}")
            continue
        top = ", ".join(f"{name} {p:.3f}" for name, p in r["top"])
        print(f"{r['image']}: {top}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cloud",
        default=cloud_location(),
        help=f"Flight location of the cloud (default: the local service, {cloud_location()})",
    )
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub: Any) -> None:
    from mist_fed.core.methods import METHODS

    p = sub.add_parser(
        "client", help="one edge device: pull features, train, evaluate (or `client predict`)"
    )
    p.add_argument("--task", help="task spec (default: the real offline task when available)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="device profile name or .toml path")
    p.add_argument(
        "--out",
        help="output directory for lae.safetensors and metrics.json "
        "(default runs/<task>-<method>-<time>/)",
    )
    p.add_argument(
        "--method",
        default=STUDIED_METHOD,
        choices=list(METHODS),
        help=f"edge method (default {STUDIED_METHOD}: chosen by {STUDIED_WIRE_SOURCE})",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default 30)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    p.add_argument("--batch-size", type=int, help="batch size (default 32)")
    p.add_argument("--micro-batch", type=int, help="rows per forward/backward (0 = whole batch)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--dtype",
        type=wire_arg,
        metavar="DTYPE",
        help=f"wire dtype (default {STUDIED_WIRE}, chosen by {STUDIED_WIRE_SOURCE}, for "
        "methods that read a projection on a backbone of >= 192 channels; else float16): "
        f"{WIRE_HELP}",
    )
    p.add_argument(
        "--device-dir",
        help="the device's storage: features land here once (default $MIST_FED_CACHE/device)",
    )
    p.add_argument("--k", help="candidate k values, comma-separated (default {N/3, 2N/3, N})")
    p.add_argument("--upload", action="store_true", help="upload this device's own images")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="run the shaped link N x faster than real"
    )
    p.add_argument(
        "--no-hard-memory-limit",
        action="store_true",
        help="measure the memory cap but do not set RLIMIT_DATA",
    )
    _common(p)
    p.set_defaults(handler=run)
    actions = p.add_subparsers(dest="action", required=False)
    pp = actions.add_parser("predict", help="classify local images with a saved edge model")
    pp.add_argument("--model", required=True, help="directory written by `mist-fed client --out`")
    pp.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="the device that runs the model: its link, clock and memory meter (default %(default)s)",
    )
    pp.add_argument("--top", type=int, default=5)
    pp.add_argument("images", nargs="+", help="image files")
    _common(pp)
    pp.set_defaults(handler=run_predict)
