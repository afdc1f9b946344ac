#!/usr/bin/env python
"""Two comparison runs that differ in one setting, paired seed by seed (e.g. the cloud's numerics).

    python simulations/pair_runs.py results/numerics-float32 results/numerics-default

Prints, per method, wire and task, the second run's test accuracy minus the first's: the mean
over paired seeds and its 95% interval (Student t over the seeds), and the validation difference.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from mist_fed.report.comparison import paired_runs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    base, other = (pd.read_parquet(Path(a) / "compare.parquet") for a in argv)
    paired = paired_runs(base, other)
    if paired.empty:
        print("no rows in common (same --methods, --wire and seeds in both runs?)", file=sys.stderr)
        return 1
    print(f"{argv[1]} minus {argv[0]}, test accuracy in points, paired by seed\n")
    print("| method | wire | task | pairs | val diff | test diff | 95% interval |")
    print("|---|---|---|---|---|---|---|")
    for r in paired.itertuples():
        print(
            f"| {r.label} | {r.wire_dtype} | {r.task} | {r.pairs} | {100 * r.val_diff:+.2f} | "
            f"{100 * r.test_diff:+.2f} | [{100 * r.ci95_low:+.2f}, {100 * r.ci95_high:+.2f}] |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
