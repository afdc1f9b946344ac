"""Plots of a fleet run (matplotlib, Agg backend): accuracy vs bytes, accuracy per round,
device time split into transfer and compute."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


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


def plot_accuracy_per_round(fleets: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, g in fleets.groupby("fleet"):
        g = g.sort_values("round")
        ax.plot(g["round"], g["accuracy"], marker="o", label=str(name))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per round, per task fleet")
    ax.legend(fontsize=7)
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


def plot_run(run_dir: Path, devices: pd.DataFrame, fleets: pd.DataFrame) -> list[Path]:
    return [
        plot_accuracy_vs_bytes(fleets, run_dir / "accuracy_vs_bytes.png"),
        plot_accuracy_per_round(fleets, run_dir / "accuracy_per_round.png"),
        plot_device_time(devices, run_dir / "device_time.png"),
    ]
