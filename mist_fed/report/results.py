"""The results of a fleet run on disk: ``results/<run-id>/``.

* ``devices.parquet``: one row per device per round (:data:`DEVICE_COLUMNS` first),
* ``fleets.parquet``: one row per task fleet per round (:data:`FLEET_COLUMNS` first),
* ``config.toml``: the resolved fleet spec (rerun with ``--fleet results/<id>/config.toml``)
  and, under ``[run]``, how this run was made (never read back as spec),
* ``summary.md``: the final-round table, then run facts.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w

DEVICE_COLUMNS = (
    "round",
    "device",
    "fleet",
    "task",
    "method",
    "aggregation",
    "profile",
    "status",
    "reason",
    "bytes_down",
    "bytes_up",
    "transfer_s",
    "compute_s",
    "peak_mem_mb",
    "mem_cap_mb",
    "accuracy",
    "global_accuracy",
    "num_examples",
    "feature_bytes",
    "images_down",
    "received_digest",
)
FLEET_COLUMNS = (
    "round",
    "fleet",
    "task",
    "method",
    "aggregation",
    "devices",
    "ok",
    "failed",
    "dropped",
    "stragglers",
    "accuracy",
    "bytes_down",
    "bytes_up",
    "bytes_per_image",
    "transfer_s",
    "compute_s",
    "round_time_s",
    "peak_mem_mb",
)


def new_run_id(prefix: str = "fleet") -> str:
    return f"{prefix}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def _frame(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    for c in first:
        if c not in df.columns:
            df[c] = pd.NA
    return df[list(first) + [c for c in df.columns if c not in first]]


def device_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    return _frame(rows, DEVICE_COLUMNS)


def fleet_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    return _frame(rows, FLEET_COLUMNS)


def summary_table(fleets: pd.DataFrame) -> pd.DataFrame:
    """The table a reader wants first: each fleet's last round, with totals over the run."""
    if fleets.empty:
        return pd.DataFrame()
    last = fleets.sort_values("round").groupby("fleet", sort=False).tail(1).set_index("fleet")
    total = fleets.groupby("fleet", sort=False)
    out = pd.DataFrame(
        {
            "task": last["task"],
            "method": last["method"],
            "agg": last["aggregation"],
            "devices": last["devices"],
            "ok": last["ok"],
            "failed": last["failed"],
            "dropped": last["dropped"],
            "late": last["stragglers"],
            "accuracy": last["accuracy"],
            "KB/image": total["feature_bytes"].sum()
            / total["images_down"].sum().where(lambda s: s > 0)
            / 1e3,
            "MB down": total["bytes_down"].sum() / 1e6,
            "MB up": total["bytes_up"].sum() / 1e6,
            "transfer s/dev": total["transfer_s"].mean(),
            "compute s/dev": total["compute_s"].mean(),
            "peak MB": total["peak_mem_mb"].max(),
        }
    )
    out.index.name = "fleet"
    return out.reset_index()


def format_table(df: pd.DataFrame) -> str:
    """A plain-text table (also valid GitHub Markdown)."""
    if df.empty:
        return "(no rows)"

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cols = list(df.columns)
    body = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in body)])


def write_run(
    run_dir: Path,
    spec_dict: Mapping[str, Any],
    devices: Sequence[Mapping[str, Any]],
    fleets: Sequence[Mapping[str, Any]],
    facts: Mapping[str, Any],
) -> dict[str, Path]:
    """Write the Parquet files, ``config.toml`` and ``summary.md``; return their paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dev, fl = device_frame(devices), fleet_frame(fleets)
    paths = {
        "devices": run_dir / "devices.parquet",
        "fleets": run_dir / "fleets.parquet",
        "config": run_dir / "config.toml",
        "summary": run_dir / "summary.md",
    }
    dev.to_parquet(paths["devices"], index=False)
    fl.to_parquet(paths["fleets"], index=False)
    config = dict(spec_dict)
    header = (
        "# Fleet spec of this run, resolved. Rerun it with:\n"
        f"#   python simulations/run.py --fleet {paths['config']}\n"
        "# The [run] table records how it ran; the loader ignores it.\n"
    )
    config["run"] = {k: v for k, v in facts.items() if v is not None}
    paths["config"].write_text(header + tomli_w.dumps(config))
    lines = [
        f"# Fleet run `{run_dir.name}`",
        "",
        format_table(summary_table(fl)),
        "",
        "Accuracy: last round, on the devices' test images (fedavg: the fleet's averaged model;",
        "local: each device's own). KB/image: feature bytes streamed per image; MB down also",
        "counts the weights each device receives every round. Times are device seconds",
        "(transfer from the profile's link, compute measured here and scaled to the device).",
        "",
        "## Run",
        "",
        *(f"* {k}: {v}" for k, v in facts.items() if v is not None),
    ]
    failed = dev[dev["status"] != "ok"] if not dev.empty else dev
    if not failed.empty:
        lines += ["", "## Devices not averaged in", ""]
        reasons = failed.groupby(["status", "reason"]).size().reset_index(name="rows")
        lines += [format_table(reasons)]
    paths["summary"].write_text("\n".join(lines) + "\n")
    return paths
