"""`mist-fed cloud serve`: the Arrow Flight feature service (config from cloud/serve.toml);
`mist-fed cloud warm`: have a running service embed a task's splits ahead of a run.

With no flag ``serve`` serves on loopback port 8815, with a backbone chosen from local state
(the paper's ViT-B/16 when its weights are cached here, else the offline DINOv2-S/14), every
registered named task, and says so in one line. With ``--ray ADDRESS --warm-workers N`` it
joins a Ray cluster (``local``: a Ray of its own) and spreads every warm's embedding over N
Ray workers (:mod:`mist_fed.cloud.ray_warm`); it still writes every row itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import threading
from typing import Any

from mist_fed.assets.defaults import (
    DEFAULT_PORT,
    PAPER_BACKBONE,
    STUDIED_METHOD,
    STUDIED_WIRE_SOURCE,
    cloud_location,
)
from mist_fed.cloud.numerics import NUMERICS_CHOICES, NUMERICS_HELP, RUNTIME_CHOICES, RUNTIME_HELP

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.server import FeatureServer
    from mist_fed.cloud.service import resolve_backbone

    base = ServeConfig.from_toml(args.config) if args.config else ServeConfig()
    config = base.override(
        host=args.host,
        port=args.port,
        backbone=args.backbone,
        cache_dir=args.cache_dir,
        tokens=args.tokens,
        device=args.device,
        numerics=args.numerics,
        runtime=args.runtime,
        tasks=_task_list(args.tasks),
        max_gb=args.store_max_gb,
        ray=args.ray,
        warm_workers=args.warm_workers,
    )
    if args.weights is not None:  # a weights flag replaces the file's weight source
        config = dataclasses.replace(config, weights=args.weights, random_init=False)
    elif args.random_init:
        config = dataclasses.replace(config, weights=None, random_init=True)
    config, why = resolve_backbone(config)
    with contextlib.ExitStack() as stack:
        if config.ray is not None:
            from mist_fed.fleet.runtime.cluster import ray_runtime

            address = None if config.ray == "local" else config.ray
            stack.enter_context(ray_runtime(address, None, args.verbose))
        return _serve(FeatureServer(config), config, why)


def _serve(server: Any, config: Any, why: str) -> int:
    from mist_fed.cloud.runner import in_background

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a requested stop: exit 0
    with in_background(server) as thread:
        offered = server.service.offered
        shown = ", ".join(offered[:12]) + (
            f" (+{len(offered) - 12} more)" if len(offered) > 12 else ""
        )
        log.warning(
            "serving %s on %s:%d: %s; tasks %s (Ctrl-C stops)",
            config.backbone,
            config.host,
            server.port,
            why,
            shown,
        )
        # The main thread idles here, where Ctrl-C arrives as KeyboardInterrupt: the block
        # shuts the server down and the CLI exits 130, as on any command's Ctrl-C.
        while thread.is_alive() and not stop.wait(0.5):
            pass
    return 0


def _task_list(values: list[str] | None) -> tuple[str, ...] | None:
    """``--tasks a,b c`` -> ``("a", "b", "c")``; None when the flag is absent."""
    if not values:
        return None
    return tuple(t for v in values for t in v.split(",") if t)


def register(sub: Any) -> None:
    p = sub.add_parser("cloud", help="the cloud feature service (Arrow Flight)")
    csub = p.add_subparsers(dest="cloud_command", required=True)
    s = csub.add_parser(
        "serve", help="serve Gather* features of a frozen backbone over Arrow Flight"
    )
    s.add_argument("--config", help="serve config TOML (e.g. cloud/serve.toml); flags override it")
    s.add_argument("--host", help="address to bind (default from config: loopback)")
    s.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    s.add_argument(
        "--backbone",
        help=f"timm ViT name or registered backbone (default: {PAPER_BACKBONE} when its "
        "weights are in the local cache, else the offline dinov2_s14_imgfocus)",
    )
    s.add_argument(
        "--tasks",
        nargs="+",
        metavar="SPEC",
        help="the tasks served (default: every registered named task); +SPEC adds to the "
        "default instead (+imagefolder:PATH); image folders and parametrised specs only when listed",
    )
    src = s.add_mutually_exclusive_group()
    src.add_argument("--weights", help="local weights file (.safetensors, .pth, .npz)")
    src.add_argument(
        "--random-init", action="store_true", help="random weights (tests, cost figures)"
    )
    s.add_argument("--device", help="where the backbone runs: cpu, cuda, cuda:N or auto")
    s.add_argument("--numerics", choices=NUMERICS_CHOICES, help=f"{NUMERICS_HELP} (default auto)")
    s.add_argument("--runtime", choices=RUNTIME_CHOICES, help=f"{RUNTIME_HELP} (default auto)")
    s.add_argument("--cache-dir", help="feature store directory")
    s.add_argument(
        "--store-max-gb",
        type=float,
        help="feature store size cap; least recently used shards are evicted (default 32)",
    )
    s.add_argument("--tokens", help="TOML file of [tokens.<name>] bearer tokens scoped to tasks")
    s.add_argument(
        "--ray", help="join this Ray cluster (an address, or local) to spread warms over it"
    )
    s.add_argument(
        "--warm-workers", type=int, help="Ray workers per warm (needs --ray; default 0: none)"
    )
    s.set_defaults(handler=serve)
    w = csub.add_parser("warm", help="have a running cloud embed a task's splits ahead of a run")
    w.add_argument("--cloud", default=cloud_location(), help="the cloud (default %(default)s)")
    w.add_argument("--task", required=True, help="task spec, as the cloud offers it")
    w.add_argument(
        "--splits", nargs="+", default=["train", "val", "test"], help="(default: all three)"
    )
    w.add_argument(
        "--method",
        default=STUDIED_METHOD,
        help=f"the method whose features are stored (default {STUDIED_METHOD}, chosen by "
        f"{STUDIED_WIRE_SOURCE})",
    )
    w.add_argument("--k", type=int, help="gather depth (default: every candidate k)")
    w.add_argument(
        "--dtype",
        default="float16",
        help="stored dtype (default float16: what every projected wire is served from)",
    )
    w.add_argument("--limit", type=int, help="only each split's first N rows")
    w.add_argument(
        "--cloud-token-file", help="a file holding the cloud's token (or $MIST_FED_CLOUD_TOKEN)"
    )
    w.set_defaults(handler=warm)


def warm(args: argparse.Namespace) -> int:
    """Warm ``--task``'s splits on a running cloud, one line per split."""
    import os
    from pathlib import Path

    from mist_fed.core.methods import method_gather
    from mist_fed.core.specs import candidate_ks
    from mist_fed.wire.flight import FeatureClient

    path = args.cloud_token_file
    token = Path(path).read_text().strip() if path else os.environ.get("MIST_FED_CLOUD_TOKEN")
    with FeatureClient(args.cloud, token=token) as client:
        blocks = int(client.stats()["geometry"]["num_blocks"])
        ks = [args.k] if args.k is not None else list(candidate_ks(blocks))
        specs = list(dict.fromkeys(method_gather(args.method, blocks, k) for k in ks))
        pairs = [(g.kind, g.k, args.dtype) for g in specs]
        for split in args.splits:
            r = client.warm(args.task, split, pairs, args.limit)
            print(
                f"{args.task}/{split}: {r['rows']} rows, {r['images_embedded']} images embedded"
                + (f" on {r['ray_nodes']} Ray nodes" if "ray_nodes" in r else "")
            )
    return 0
