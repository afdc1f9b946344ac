"""Plots of a fleet run (matplotlib, Agg backend): accuracy vs bytes, accuracy per round and
against simulated time (each with the fleet's central reference, dashed; synchronous and
asynchronous fleets on one chart), device time split into transfer and compute, and the
staleness of asynchronous fleets' updates."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.typing import ColorType

from mist_fed.report.results import numeric


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out, write as PNG at 120 dpi, and free the figure (every report plot ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_bytes(fleets: pd.DataFrame, path: Path) -> Path:
    """Last-round accuracy against feature bytes per image, one marker per fleet, by method."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    tot = fleets.groupby("fleet").agg(
        method=("method", "first"),
        feature_bytes=("feature_bytes", "sum"),
        images=("images_down", "sum"),
    )
    last = fleets.sort_values("round").groupby("fleet").tail(1).set_index("fleet")["accuracy"]
    tot["accuracy"] = last
    tot["kb"] = tot["feature_bytes"] / tot["images"].where(tot["images"] > 0) / 1e3
    for method, g in tot.groupby("method"):
        ax.scatter(g["kb"], g["accuracy"], label=str(method), s=40)
        for name, r in g.iterrows():
            ax.annotate(str(name), (r["kb"], r["accuracy"]), fontsize=7, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("feature bytes per image (KB, log)")
    ax.set_ylabel("accuracy (last round)")
    ax.set_title("Accuracy vs transfer per image")
    ax.legend(title="method", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _central_line(ax: Axes, fleet_rows: pd.DataFrame, color: ColorType) -> float:
    """A dashed horizontal line at the fleet's central accuracy (its last round's), in the
    fleet's colour; returns it, NaN and nothing drawn when there is none (an older run)."""
    central = numeric(fleet_rows.sort_values("round", kind="stable"), "central_accuracy")
    if central.empty or math.isnan(central.iloc[-1]):
        return math.nan
    ax.axhline(central.iloc[-1], color=color, linestyle="--", linewidth=1, alpha=0.8)
    return float(central.iloc[-1])


def _finish_accuracy(ax: Axes, centrals: list[float]) -> None:
    """Keep the dashed central lines inside the axes; the legend: the fleets' lines and one
    "central" entry for the dashed references (when any is drawn)."""
    drawn = [c for c in centrals if not math.isnan(c)]
    handles, labels = ax.get_legend_handles_labels()
    if drawn:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, min(drawn) - 0.02), max(hi, max(drawn) + 0.02))
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1))
        labels.append("central")
    if handles:
        ax.legend(handles, labels, fontsize=7)


def plot_accuracy_per_round(fleets: pd.DataFrame, path: Path) -> Path:
    """Accuracy per round, one line per fleet, its central reference dashed."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    centrals = []
    for name, g in fleets.groupby("fleet"):
        g = g.sort_values("round", kind="stable")
        (line,) = ax.plot(g["round"], numeric(g, "accuracy"), marker="o", label=str(name))
        centrals.append(_central_line(ax, g, line.get_color()))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per round, per task fleet")
    _finish_accuracy(ax, centrals)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_vs_sim_time(fleets: pd.DataFrame, path: Path) -> Path:
    """Accuracy against cumulative simulated time (seconds, minutes or hours, whichever reads
    best), one line per fleet with a marker per round, its central reference dashed. A fleet
    without simulated times (an older run) is left out."""
    longest = float(numeric(fleets, "sim_time_s").max()) if not fleets.empty else math.nan
    unit, scale = (
        ("hours", 3600.0)
        if longest >= 7200
        else ("minutes", 60.0)
        if longest >= 120
        else ("seconds", 1.0)
    )
    return _accuracy_against(
        fleets, path, "sim_time_s", scale, f"simulated time ({unit})", "simulated time"
    )


def plot_accuracy_vs_device_hours(fleets: pd.DataFrame, path: Path) -> Path:
    """Accuracy against the cumulative simulated device-hours the fleet's devices spent
    (transfer and compute, every device of every round): what the fleet's accuracy costs."""
    return _accuracy_against(
        fleets, path, "sim_device_hours", 1.0, "simulated device-hours", "device-hours"
    )


def _accuracy_against(
    fleets: pd.DataFrame, path: Path, column: str, scale: float, xlabel: str, what: str
) -> Path:
    """One line per fleet of accuracy against ``column / scale``, a marker per round, its
    central reference dashed; a fleet without the column (an older run) is left out."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    centrals = []
    for name, g in fleets.groupby("fleet"):
        g = g.sort_values("round", kind="stable")
        x = numeric(g, column) / scale
        if x.isna().all():
            continue
        label = f"{name} ({g['aggregation'].iloc[-1]})" if "aggregation" in g else str(name)
        marker = "o" if len(g) <= 40 else None  # a FedAsync fleet steps once per update
        (line,) = ax.plot(x, numeric(g, "accuracy"), marker=marker, markersize=3, label=label)
        centrals.append(_central_line(ax, g, line.get_color()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy vs {what}, per task fleet")
    _finish_accuracy(ax, centrals)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_device_time(devices: pd.DataFrame, path: Path) -> Path:
    """Mean device seconds per round, transfer and compute stacked, per fleet and profile."""
    ok = devices[devices["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if not ok.empty:
        g = ok.groupby(["fleet", "profile"])[["transfer_s", "compute_s"]].mean()
        labels = [f"{f}\n{p}" for f, p in g.index]
        x = range(len(g))
        ax.bar(x, g["transfer_s"], label="transfer")
        ax.bar(x, g["compute_s"], bottom=g["transfer_s"], label="compute")
        ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("device seconds per round (mean)")
    ax.set_title("Device time: transfer vs compute")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_staleness(devices: pd.DataFrame, path: Path) -> Path | None:
    """Histogram of the staleness of asynchronous fleets' consumed updates (server steps between
    the model a device trained from and the step that took its update), one series per fleet;
    None and no file when no fleet is asynchronous."""
    stale = numeric(devices, "staleness")
    rows = devices[stale.notna()].assign(staleness=stale[stale.notna()])
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    top = int(rows["staleness"].max())
    bins = [b - 0.5 for b in range(top + 2)]
    for name, g in rows.groupby("fleet"):
        label = f"{name} ({g['aggregation'].iloc[-1]})"
        ax.hist(g["staleness"], bins=bins, alpha=0.6, label=label)
    ax.set_xlabel("staleness (server steps)")
    ax.set_ylabel("updates")
    ax.set_title("Staleness of asynchronous updates")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_run(run_dir: Path, devices: pd.DataFrame, fleets: pd.DataFrame) -> list[Path]:
    paths = [
        plot_accuracy_vs_bytes(fleets, run_dir / "accuracy_vs_bytes.png"),
        plot_accuracy_per_round(fleets, run_dir / "accuracy_per_round.png"),
        plot_accuracy_vs_sim_time(fleets, run_dir / "accuracy_vs_sim_time.png"),
        plot_accuracy_vs_device_hours(fleets, run_dir / "accuracy_vs_device_hours.png"),
        plot_device_time(devices, run_dir / "device_time.png"),
    ]
    stale = plot_staleness(devices, run_dir / "staleness.png")
    return paths + ([stale] if stale is not None else [])
