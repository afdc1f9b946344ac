"""The fleet run's report: the federated gap, time to accuracy, summary.md and the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mist_fed.report.plots import plot_run
from mist_fed.report.results import (
    FLEET_COLUMNS,
    device_frame,
    fleet_frame,
    summary_table,
    time_to_fraction,
    write_run,
)

SPEC = {"fleets": [{"task": "synthetic", "devices": 2}], "profiles": "rpi4"}


def _fleet(
    name: str,
    accuracies: list[float],
    central: float,
    aggregation: str = "FedAvg",
    round_s: float = 10.0,
) -> list[dict[str, Any]]:
    """One fleet's rows as the runner writes them: ``round_s`` simulated seconds a round."""
    return [
        {"round": rnd, "fleet": name, "task": "t", "method": "mist", "aggregation": aggregation,
         "devices": 2, "sampled": 2, "ok": 2, "failed": 0, "dropped": 0, "stragglers": 0,
         "accuracy": acc, "central_accuracy": central, "eval_images": 1000,
         "mean_device_accuracy": acc, "sample_steps": 24 * rnd, "central_sample_steps": 24 * 4,
         "bytes_down": 200, "bytes_up": 50, "feature_bytes": 80, "images_down": 4,
         "bytes_per_image": 20.0, "transfer_s": 1.0, "compute_s": 2.0, "round_time_s": round_s,
         "sim_time_s": round_s * rnd, "device_hours": 2 * 3.0 / 3600,
         "sim_device_hours": 2 * 3.0 * rnd / 3600, "peak_mem_mb": 10.0}
        for rnd, acc in enumerate(accuracies, start=1)
    ]  # fmt: skip


def _devices(fleet: str = "t/mist") -> list[dict[str, Any]]:
    return [
        {"round": 1, "device": d, "fleet": fleet, "task": "t", "method": "mist",
         "aggregation": "FedAvg", "profile": "rpi4", "status": "ok", "reason": "",
         "accuracy": 0.5}
        for d in (0, 1)
    ]  # fmt: skip


# -- time to a fraction of the final accuracy ----------------------------------------------------


def test_time_to_fraction_is_the_first_round_reaching_it() -> None:
    # Prepare: 95% of the final 0.8 is 0.76, first reached in round 3
    rows = pd.DataFrame(_fleet("f", [0.2, 0.6, 0.77, 0.8], central=0.9))
    # Execute
    t = time_to_fraction(rows)
    # Assert
    assert t == pytest.approx(30.0)
    assert time_to_fraction(rows, fraction=0.7) == pytest.approx(20.0)  # 0.56: round 2
    assert time_to_fraction(rows, fraction=1.0) == pytest.approx(40.0)


def test_time_to_fraction_sorts_by_round_and_counts_a_later_dip() -> None:
    # Prepare: rows out of order; round 2 reaches 95% of the final accuracy, round 3 dips
    rows = pd.DataFrame(_fleet("f", [0.5, 0.79, 0.6, 0.8], central=0.9)).iloc[[3, 1, 0, 2]]
    # Execute
    t = time_to_fraction(rows)
    # Assert: the first time it got there, not the last time it stayed there
    assert t == pytest.approx(20.0)


def test_time_to_fraction_is_nan_without_a_final_accuracy_or_a_clock() -> None:
    # Prepare
    nan_last = pd.DataFrame(_fleet("f", [0.2, 0.6, math.nan], central=0.9))
    nan_early = pd.DataFrame(_fleet("f", [math.nan, 0.6, 0.8], central=0.9))
    no_clock = nan_early.drop(columns=["sim_time_s"])
    # Execute / Assert
    assert math.isnan(time_to_fraction(nan_last))
    assert time_to_fraction(nan_early) == pytest.approx(30.0)  # a NaN round never reaches it
    assert math.isnan(time_to_fraction(no_clock))
    assert math.isnan(time_to_fraction(nan_early.iloc[:0]))


# -- the summary table ---------------------------------------------------------------------------


def test_summary_table_has_the_gap_to_central_and_the_clock() -> None:
    # Prepare: a federated fleet 1.7 points under its central reference, a local one above
    rows = _fleet("a/fed", [0.3, 0.784], central=0.801) + _fleet(
        "a/local", [0.4, 0.5], central=math.nan, aggregation="local", round_s=1800.0
    )
    # Execute
    table = summary_table(fleet_frame(rows)).set_index("fleet")
    # Assert
    assert table.loc["a/fed", "central"] == pytest.approx(0.801)
    assert table.loc["a/fed", "gap"] == pytest.approx(-1.7)
    assert math.isnan(table.loc["a/local", "central"]) and math.isnan(table.loc["a/local", "gap"])
    assert table.loc["a/local", "sim min"] == pytest.approx(60.0)
    assert table.loc["a/local", "t95 min"] == pytest.approx(60.0)  # 0.5 first reached in round 2
    assert table.loc["a/fed", "dev-h"] == pytest.approx(12 / 3600)
    assert list(table.index) == ["a/fed", "a/local"]


def test_summary_table_of_an_older_run_has_nan_for_the_new_columns() -> None:
    # Prepare: rows written before central_accuracy and the simulated clock existed
    old = [
        {k: v for k, v in r.items() if k not in ("central_accuracy", "sim_time_s",
                                                 "sim_device_hours", "eval_images")}
        for r in _fleet("t/mist", [0.5, 1.0], central=0.0)
    ]  # fmt: skip
    # Execute
    table = summary_table(pd.DataFrame(old))
    # Assert
    assert table.loc[0, "accuracy"] == 1.0
    assert all(
        math.isnan(table.loc[0, c]) for c in ("central", "gap", "sim min", "dev-h", "t95 min")
    )


# -- the files of a run --------------------------------------------------------------------------


def test_write_run_and_plot_run_write_the_gap_and_the_sim_time_plot(tmp_path: Path) -> None:
    # Prepare
    fleets = _fleet("t/fed", [0.2, 0.6, 0.77, 0.8], central=0.825, round_s=900.0) + _fleet(
        "t/local", [0.5, 0.6, 0.6, 0.6], central=0.7, aggregation="local"
    )
    devices = _devices()
    # Execute
    paths = write_run(tmp_path / "run", SPEC, devices, fleets, {"wall_s": 1.0})
    plots = plot_run(tmp_path / "run", device_frame(devices), fleet_frame(fleets))
    # Assert
    assert (tmp_path / "run" / "accuracy_vs_sim_time.png") in plots
    assert (tmp_path / "run" / "accuracy_vs_device_hours.png") in plots
    assert all(p.stat().st_size > 0 for p in plots)
    summary = paths["summary"].read_text()
    assert "## Federated gap and time to accuracy" in summary
    assert (
        "* t/fed (FedAvg): 80.0% vs central 82.5% (gap -2.5 points, paired on 1000 test images);"
        " 95% of final accuracy after 45.0 min simulated (round 3 of 4)"
    ) in summary
    assert "* t/local (local): 60.0% vs central 70.0% (gap -10.0 points, not paired" in summary
    fl = pd.read_parquet(paths["fleets"])
    assert list(fl.columns[: len(FLEET_COLUMNS)]) == list(FLEET_COLUMNS)


def test_an_older_run_without_the_new_columns_still_writes(tmp_path: Path) -> None:
    # Prepare: the columns of a run before the server-side score and the simulated clock
    keep = ("round", "fleet", "task", "method", "aggregation", "devices", "ok", "failed",
            "dropped", "stragglers", "accuracy", "bytes_down", "bytes_up", "feature_bytes",
            "images_down", "bytes_per_image", "transfer_s", "compute_s", "round_time_s",
            "peak_mem_mb")  # fmt: skip
    old = [{k: r[k] for k in keep} for r in _fleet("t/mist", [0.5, 0.6], central=0.0)]
    devices = [{**d, "global_accuracy": 0.6} for d in _devices()]
    # Execute
    paths = write_run(tmp_path / "run", SPEC, devices, old, {"wall_s": 1.0})
    plots = plot_run(tmp_path / "run", device_frame(devices), fleet_frame(old))
    # Assert
    fl = pd.read_parquet(paths["fleets"])
    assert fl["central_accuracy"].isna().all() and fl["sim_time_s"].isna().all()
    assert (
        "* t/mist (FedAvg): 60.0%, no central reference; 95% of final accuracy at round 2 of 2"
        in (paths["summary"].read_text())
    )
    assert len(plots) == 5 and all(p.is_file() for p in plots)
