#!/usr/bin/env python
"""Asynchronous against synchronous federation (issue #26) on one heterogeneous fleet, over
seeds, through the plain loop (no Flower runtime, no Ray: the same rounds, engine, devices
and scoring as ``simulations/run.py``; only the transport differs).

    python simulations/async_vs_sync.py --fleet simulations/fleets/async-vs-sync-digits.toml \\
        --seeds 0 1 2 --deadline-s 1.0 \\
        --results docs/results/async-vs-sync

For each seed: one run of ``--fleet`` (its synchronous and asynchronous fleets, the same
devices' data) and one run of its synchronous fleets alone with ``--deadline-s``; then
``table.md`` in ``--results`` with, per fleet, the final accuracy, the simulated time, and the
simulated time until the fleet first reached the synchronous fleet's final accuracy (the
first fleet of the spec, no deadline), each a mean over the seeds. ``--table`` rewrites the
table from the completed runs already there; a rerun skips the runs already completed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import tomllib
from pathlib import Path

import pandas as pd

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mist_fed.fleet import aggregation
from mist_fed.fleet.runtime.provision import resolve_assets
from mist_fed.fleet.runtime.session import run_plain
from mist_fed.fleet.spec import load_fleet
from mist_fed.report.results import format_table, numeric, time_to_accuracy

FLEET = Path(__file__).resolve().parent / "fleets" / "async-vs-sync.toml"


def runs(args: argparse.Namespace) -> None:
    base = load_fleet(args.fleet)
    sync = tuple(f for f in base.fleets if not aggregation.is_async(f.aggregation))
    for seed in args.seeds:
        spec = resolve_assets(dataclasses.replace(base, seed=seed))
        if not completed(args.results / f"seed{seed}"):
            run_plain(spec, args.results, run_id=f"seed{seed}")
        late = dataclasses.replace(
            spec,
            fleets=tuple(dataclasses.replace(f, name=f"{f.name}-deadline") for f in sync),
            deadline_s=args.deadline_s,
        )
        if not completed(args.results / f"seed{seed}-deadline"):
            run_plain(late, args.results, run_id=f"seed{seed}-deadline")


def completed(run: Path) -> bool:
    """A run already there and finished (a rerun of the script goes on with the rest)."""
    config = run / "config.toml"
    if not config.is_file():
        return False
    return not tomllib.loads(config.read_text()).get("run", {}).get("interrupted", False)


def table(results: Path) -> str:
    rows, reference = [], ""
    for run in sorted(results.glob("seed*/fleets.parquet")):
        if not completed(run.parent):
            continue  # a run stopped part-way: its checkpointed rounds only
        seed = run.parent.name.removeprefix("seed").removesuffix("-deadline")
        frame = pd.read_parquet(run)
        if not run.parent.name.endswith("-deadline"):
            reference = str(frame["fleet"].iloc[0])  # the spec's first fleet: synchronous
        rows.append(frame.assign(seed=int(seed)))
    if not rows or not reference:
        return "(no runs)"
    fleets = pd.concat(rows, ignore_index=True)
    out = []
    for name, g in fleets.groupby("fleet", sort=False):
        per_seed = []
        for seed, s in g.groupby("seed"):
            ref = fleets[(fleets["fleet"] == reference) & (fleets["seed"] == seed)]
            if ref.empty:
                continue  # that seed's mixed run did not complete
            ref = ref.sort_values("round")
            target = float(numeric(ref, "accuracy").iloc[-1])
            s = s.sort_values("round")
            per_seed.append({
                "final": float(numeric(s, "accuracy").iloc[-1]),
                "sim_s": float(numeric(s, "sim_time_s").iloc[-1]),
                "to_ref_s": time_to_accuracy(s, target),
                "ref_sim_s": float(numeric(ref, "sim_time_s").iloc[-1]),
                "steps": int(s["round"].iloc[-1]),
                "staleness": float(numeric(s, "staleness_mean").mean()),
            })  # fmt: skip
        if not per_seed:
            continue
        p = pd.DataFrame(per_seed)
        reached = p["to_ref_s"].notna().sum()
        out.append({
            "fleet": name, "agg": g["aggregation"].iloc[-1], "seeds": len(p),
            "steps": int(p["steps"].iloc[0]),
            "final acc %": " / ".join(f"{100 * a:.1f}" for a in p["final"]),
            "mean %": 100 * p["final"].mean(),
            "sim s": p["sim_s"].mean(),
            "s to sync final": p["to_ref_s"].mean() if reached == len(p) else math.nan,
            "reached": f"{reached}/{len(p)}",
            "time / sync's": (p["to_ref_s"] / p["ref_sim_s"]).mean()
            if reached == len(p) else math.nan,
            "staleness": p["staleness"].mean(),
        })  # fmt: skip
    return format_table(pd.DataFrame(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fleet", default=str(FLEET))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--deadline-s", type=float, default=4.0)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--table", action="store_true", help="only rewrite the README's table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.table:
        runs(args)
    text = table(args.results)
    (args.results / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
