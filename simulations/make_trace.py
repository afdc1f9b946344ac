"""A small synthetic availability trace: ``python simulations/make_trace.py`` writes
``simulations/traces/example.csv`` (100 phones, 2 days, online while charging; the format is in
docs/fleets.md). Use it with ``--availability trace:simulations/traces/example.csv``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mist_fed.fleet.availability import synthetic_trace

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--days", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "traces" / "example.csv"))
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# python simulations/make_trace.py --devices {args.devices} --days {args.days} --seed {args.seed}\n"
    out.write_text(header + "\n".join(synthetic_trace(args.devices, args.days, args.seed)) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
