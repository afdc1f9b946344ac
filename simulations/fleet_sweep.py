#!/usr/bin/env python
"""One fleet setting through the plain loop (no Flower runtime, no Ray): its final accuracy,
its centralized reference and the wall time, appended as one JSON line to ``--out``.

    python simulations/fleet_sweep.py --cloud grpc://127.0.0.1:8815 \\
        --set '{"method": "mist_pool", "rounds": 10, "local_epochs": 3, "lr": 0.005}' \\
        --out docs/results/fleet-sweep/sweep.jsonl

The rounds are the fleet's own (:class:`~mist_fed.fleet.rounds.SyncRounds`: the same
strategies, devices, central reference and server-side scoring as ``simulations/run.py``);
only the transport differs (devices run one after another in this process), so a sweep does
not pay Ray's start-up per setting. ``--set`` takes the overrides ``simulations/run.py`` has
(snake_case; ``aggregation_args`` as a JSON string). Start a cloud first
(``mist-fed cloud serve``): every setting reads the same warm feature store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mist_fed.fleet.runtime.provision import resolve_assets
from mist_fed.fleet.runtime.session import run_plain
from mist_fed.fleet.spec import apply_overrides, load_fleet

DEFAULT_FLEET = Path(__file__).resolve().parent / "fleets" / "default.toml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fleet", default=str(DEFAULT_FLEET))
    p.add_argument("--cloud", default="grpc://127.0.0.1:8815")
    p.add_argument("--set", default="{}", help="overrides as a JSON object")
    p.add_argument("--out", required=True, help="JSON-lines file the result is appended to")
    p.add_argument(
        "--table", action="store_true", help="print --out as a Markdown table; run nothing"
    )
    args = p.parse_args(argv)
    if args.table:
        print(table(Path(args.out)))
        return 0
    logging.basicConfig(level=logging.WARNING)
    setting = json.loads(args.set)
    spec = resolve_assets(apply_overrides(load_fleet(args.fleet), **setting))
    t0 = time.perf_counter()
    rec = run_plain(spec, cloud=args.cloud).records
    wall = time.perf_counter() - t0
    for fleet in spec.fleets:
        rows = [r for r in rec.fleets if r["fleet"] == fleet.name]
        out = {
            "setting": setting,
            "fleet": fleet.name,
            "aggregation": fleet.aggregation,
            "rounds": spec.rounds,
            "accuracy": [round(float(r["accuracy"]), 4) for r in rows],
            "final": round(float(rows[-1]["accuracy"]), 4),
            "central": round(float(rows[-1]["central_accuracy"]), 4),
            "eval_images": int(rows[-1]["eval_images"]),
            "sim_time_s": round(float(rows[-1]["sim_time_s"]), 1),
            "wall_s": round(wall, 1),
        }
        print(json.dumps(out))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


def table(path: Path) -> str:
    """The sweep as a Markdown table, one row per setting and fleet, in the order run."""
    lines = [
        "| setting | strategy | rounds | final | central | gap (points) | sim min | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        s = {k: v for k, v in r["setting"].items() if k not in ("aggregation", "rounds")}
        setting = ", ".join(f"{k}={v}" for k, v in s.items())
        gap = 100 * (r["final"] - r["central"])
        lines.append(
            f"| {setting} | {r['aggregation']} | {r['rounds']} | {100 * r['final']:.1f} | "
            f"{100 * r['central']:.1f} | {gap:+.1f} | {r['sim_time_s'] / 60:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
