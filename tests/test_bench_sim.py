"""`mist-fed bench sim`: the table's shape and arithmetic (not its timings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mist_fed.commands import build_parser
from mist_fed.fleet.runtime.sim_bench import BenchResult, Measured

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "devices",
    "device-rounds",
    "ok plain",
    "ok flower",
    "plain s",
    "flower+ray s",
    "ray start/stop s",
    "overhead ms/dev-round",
    "driver peak MB",
    "driver rounds peak MB",
    "plain peak MB",
    "MB/added device",
    "rounds MB/added device",
    "marginal ms/added dev-round",
]


def _run(engine: str, n: int, wall: float, rss: float, startup: float = 0.0) -> Measured:
    return Measured(engine, n, n, wall, startup, wall + startup, rss, rss - 100.0, {"ok": n})


def test_rows_put_both_engines_side_by_side_with_the_overhead_and_rss_growth() -> None:
    # Prepare: 4 and 8 devices x 1 round
    runs = [
        _run("plain", 4, 2.0, 500.0),
        _run("flower", 4, 3.0, 600.0, startup=10.0),
        _run("plain", 8, 4.0, 510.0),
        _run("flower", 8, 5.4, 608.0, startup=11.0),
    ]
    # Execute
    small, big = BenchResult(runs).rows()
    # Assert
    assert list(small) == COLUMNS and list(big) == COLUMNS
    assert small["overhead ms/dev-round"] == pytest.approx((3.0 - 2.0) / 4 * 1e3)
    assert big["overhead ms/dev-round"] == pytest.approx((5.4 - 4.0) / 8 * 1e3)
    assert big["ray start/stop s"] == 11.0  # shown apart, never in the overhead
    assert math.isnan(small["MB/added device"])
    assert big["MB/added device"] == pytest.approx((608.0 - 600.0) / 4)
    assert big["rounds MB/added device"] == pytest.approx((508.0 - 500.0) / 4)
    assert big["marginal ms/added dev-round"] == pytest.approx(((5.4 - 4.0) - 1.0) / 4 * 1e3)


def test_bench_sim_takes_the_small_size_and_an_output_directory() -> None:
    args = build_parser().parse_args(
        ["bench", "sim", "--devices", "1000", "--small", "50", "--out", "x"]
    )
    assert (args.devices, args.small, args.out) == (1000, 50, "x")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network
def test_bench_sim_runs_both_engines_at_two_sizes(tmp_path: Path) -> None:
    # Prepare: the synthetic fleet, 2 and 4 devices x 1 round x 1 local epoch
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "mist_fed.cli", "bench", "sim"]
    cmd += ["--fleet", str(ROOT / "simulations" / "fleets" / "synthetic.toml")]
    cmd += ["--devices", "4", "--small", "2", "--rounds", "1", "--local-epochs", "1"]
    cmd += ["--out", str(out)]
    env = {"FLWR_TELEMETRY_ENABLED": "0", "MIST_FED_CACHE": str(tmp_path / "cache")}
    # Execute
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=900
    )
    # Assert: every device-round ok on both engines; the table's arithmetic holds
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    small, big = data["rows"]
    assert (small["devices"], big["devices"]) == (2, 4)
    for row in (small, big):
        assert row["ok plain"] == row["ok flower"] == row["device-rounds"] == row["devices"]
        overhead = (row["flower+ray s"] - row["plain s"]) / row["device-rounds"] * 1e3
        assert row["overhead ms/dev-round"] == pytest.approx(overhead)
    assert big["MB/added device"] == pytest.approx(
        (big["driver peak MB"] - small["driver peak MB"]) / 2
    )
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| devices |") and "overhead ms/dev-round" in table


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
