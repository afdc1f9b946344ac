"""The comparison's outputs: ``compare.parquet`` / ``compare.md`` (Table 1's shape) and plots.

* ``compare.parquet``: one row per variant (method x wire dtype), task and seed (and shots in
  few-shot mode): what each device job measured;
* ``compare_summary.parquet``: one row per variant and task, accuracy as mean and spread
  (sample std) over seeds, with :data:`COMPARE_COLUMNS` first;
* ``compare.md``: method, wire, MB per image, edge params, edge and cloud GMACs, the device
  job's peak memory and compute seconds on its profile, accuracy per task (mean ± std) and
  their mean; then, where the run has MIST on the float32 wire and other wires, each wire's
  paired difference to it (:func:`paired_differences`) and the wire chosen on validation
  under a byte budget (:func:`choose_wire`);

Per-seed rows carry the device's own :class:`~mist_fed.device.metrics.DeviceMetrics` names
(``feature_bytes``, ``images_down``, ``peak_mem_mb``, ``compute_s``, ``host_compute_s``,
``edge_params``, ``edge_macs``, ...), the names ``metrics.json`` and ``devices.parquet`` use.
* ``accuracy_vs_bytes.png``: accuracy against bytes per image (log x), every method and wire,
  the Pareto front marked, and a 224-px JPEG of the same images as a reference line;
* few-shot mode: ``fewshot.md`` and ``accuracy_vs_shots.png`` instead of the table above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from mist_fed.files import atomic_path
from mist_fed.report.plots import save_figure

REFERENCE = ("mist", "float32")  # (label, wire): what the other wires are paired with
WIRE_BUDGET = 10_000  # bytes per image a chosen wire may cost (#17)
WIRE_METHODS = ("mist", "mist_pool")  # the rows a wire is chosen among: MIST's own
# two-sided 95% Student t quantiles by degrees of freedom (n - 1 paired seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

COMPARE_COLUMNS = (
    "method",
    "wire_dtype",
    "task",
    "bytes_per_image",
    "edge_params",
    "edge_macs",
    "cloud_macs",
    "peak_mem_mb",
    "compute_s",
    "accuracy",
)
_KEYS = ["label", "method", "wire_dtype", "group"]
_MARKERS = "osD^vP*Xh<>p"


def seeds_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def aggregate(seeds: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds: one row per (variant, task[, shots])."""
    keys = _KEYS + ["task"] + (["shots"] if seeds["shots"].notna().any() else [])
    g = seeds.groupby(keys, sort=False, dropna=False)
    df = g.agg(
        bytes_per_image=("bytes_per_image", "mean"),
        edge_params=("edge_params", "first"),
        edge_macs=("edge_macs", "first"),
        cloud_macs=("cloud_macs", "first"),
        peak_mem_mb=("peak_mem_mb", "max"),
        compute_s=("compute_s", "mean"),
        host_compute_s=("host_compute_s", "mean"),
        transfer_s=("transfer_s", "mean"),
        accuracy=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        seeds=("seed", "nunique"),
        ks=("k", lambda s: _ks(str(int(v)) for v in s.dropna())),
        profile=("profile", "first"),
    ).reset_index()
    df["accuracy_std"] = df["accuracy_std"].fillna(0.0)
    first = [c for c in COMPARE_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _ks(ks: Iterable[str]) -> str:
    """The distinct k of a row's fits, in order (``"4,8,12"``); empty when it has none."""
    return ",".join(sorted({k for k in ks if k}, key=int))


def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")


def markdown_table(agg: pd.DataFrame) -> str:
    """Table 1's shape: one line per variant, accuracy per task and the mean over tasks."""
    tasks = list(dict.fromkeys(agg["task"]))
    head = [
        "method",
        "wire",
        "k",
        "MB/img",
        "edge params (M)",
        "edge GMACs",
        "cloud GMACs",
        "edge peak (MB)",
        "device s",
        *tasks,
    ]
    if len(tasks) > 1:
        head.append("mean")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, g in agg.groupby(_KEYS, sort=False):
        r = g.iloc[0]
        cells = [
            str(r["label"]),
            str(r["wire_dtype"]),
            _ks(k for ks in g["ks"] for k in str(ks).split(",")) or "-",  # every task's
            f"{g['bytes_per_image'].mean() / 1e6:.4f}",
            f"{r['edge_params'] / 1e6:.3f}",
            f"{r['edge_macs'] / 1e9:.4f}",
            f"{r['cloud_macs'] / 1e9:.3f}",
            f"{g['peak_mem_mb'].max():.0f}",
            f"{g['compute_s'].mean():.1f}",
        ]
        by_task = g.set_index("task")
        for t in tasks:
            if t in by_task.index:
                row = by_task.loc[t]
                cells.append(_pm(row["accuracy"], row["accuracy_std"], int(row["seeds"])))
            else:
                cells.append("-")
        if len(tasks) > 1:
            cells.append(f"{100 * g['accuracy'].mean():.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fewshot_table(agg: pd.DataFrame) -> str:
    """Accuracy (mean ± std over seeds) per variant and shots, one block per task."""
    out = []
    for task, g in agg.groupby("task", sort=False):
        shots = sorted(int(s) for s in g["shots"].dropna().unique())
        out.append(f"### {task}\n")
        out.append("| method | wire | " + " | ".join(f"{s}-shot" for s in shots) + " |")
        out.append("|" + "---|" * (2 + len(shots)))
        for _, v in g.groupby(_KEYS, sort=False):
            by = v.set_index("shots")
            cells = [
                _pm(by.loc[s, "accuracy"], by.loc[s, "accuracy_std"], int(by.loc[s, "seeds"]))
                if s in by.index
                else "-"
                for s in shots
            ]
            out.append(
                f"| {v.iloc[0]['label']} | {v.iloc[0]['wire_dtype']} | " + " | ".join(cells) + " |"
            )
        out.append("")
    return "\n".join(out)


def paired_differences(seeds: pd.DataFrame, reference: tuple[str, str] = REFERENCE) -> pd.DataFrame:
    """Each variant's accuracy minus the ``reference`` variant's, paired by task and seed.

    One row per variant and task: the mean paired difference of test and of validation
    accuracy, the test differences' sample std, the number of pairs and a 95% interval for the
    mean test difference (Student t over the paired seeds: the seed is the unit, so the
    interval covers the run-to-run spread of training, not only the test set's sampling).
    Empty when the run has no ``reference`` rows.
    """
    label, wire = reference
    ref = seeds[(seeds["label"] == label) & (seeds["wire_dtype"] == wire)]
    if ref.empty:
        return pd.DataFrame()
    ref = ref.set_index(["task", "seed"])[["accuracy", "val_accuracy"]]
    out = []
    for (lab, w, task), g in seeds.groupby(["label", "wire_dtype", "task"], sort=False):
        if (lab, w) == reference:
            continue
        g = g.set_index(["task", "seed"])
        both = g.join(ref, rsuffix="_ref", how="inner")
        if both.empty:
            continue
        d = both["accuracy"] - both["accuracy_ref"]
        n = len(d)
        sd = float(d.std()) if n > 1 else float("nan")
        half = _T95.get(n - 1, 1.96) * sd / n**0.5 if n > 1 else float("nan")
        out.append(
            {
                "label": lab,
                "wire_dtype": w,
                "task": task,
                "bytes_per_image": float(g["bytes_per_image"].mean()),
                "pairs": n,
                "val_diff": float((both["val_accuracy"] - both["val_accuracy_ref"]).mean()),
                "test_diff": float(d.mean()),
                "test_diff_std": sd,
                "ci95_low": float(d.mean()) - half,
                "ci95_high": float(d.mean()) + half,
            }
        )
    return pd.DataFrame(out)


def choose_wire(
    paired: pd.DataFrame, budget: float = WIRE_BUDGET, methods: Sequence[str] = WIRE_METHODS
) -> pd.Series | None:
    """The MIST wire chosen on validation only: among ``methods``' rows within ``budget``
    bytes per image, the best paired validation accuracy (ties: fewer bytes). The test
    columns play no part. ``None`` if no row is within the budget."""
    if paired.empty:
        return None
    ok = paired[paired["label"].isin(list(methods)) & (paired["bytes_per_image"] <= budget)]
    if ok.empty:
        return None
    return ok.sort_values(["val_diff", "bytes_per_image"], ascending=[False, True]).iloc[0]


def paired_table(
    paired: pd.DataFrame,
    chosen: pd.Series | None,
    reference: tuple[str, str] = REFERENCE,
    budget: float = WIRE_BUDGET,
) -> str:
    """Markdown: every wire's paired difference to the reference, by bytes, the choice named."""
    label, wire = reference
    lines = [
        f"### Paired with {label} [{wire}] (same task and seed)\n",
        f"Chosen on validation only: of the MIST rows ({', '.join(WIRE_METHODS)}) at <= "
        f"{budget:,.0f} bytes per image, the best mean paired validation difference to "
        f"{label} [{wire}] (ties: fewer bytes). Test: the mean paired difference and its 95% "
        "interval (Student t over the seeds).\n",
        "| method | wire | bytes/img | pairs | val diff (pt) | test diff (pt) | test 95% interval |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for _, r in paired.sort_values("bytes_per_image").iterrows():
        pick = (
            chosen is not None
            and r["label"] == chosen["label"]
            and r["wire_dtype"] == chosen["wire_dtype"]
            and r["task"] == chosen["task"]
        )
        name = f"**{r['label']}**" if pick else str(r["label"])
        lines.append(
            f"| {name} | {r['wire_dtype']}{' (chosen)' if pick else ''} | "
            f"{r['bytes_per_image']:,.0f} | {int(r['pairs'])} | {100 * r['val_diff']:+.2f} | "
            f"{100 * r['test_diff']:+.2f} | "
            f"[{100 * r['ci95_low']:+.2f}, {100 * r['ci95_high']:+.2f}] |"
        )
    if chosen is None:
        lines.append(f"\nNo MIST row at <= {budget:,.0f} bytes per image.")
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal bytes AND higher accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_accuracy_vs_bytes(
    agg: pd.DataFrame, path: Path, references: Mapping[str, float] | None = None
) -> Path:
    """Accuracy vs bytes per image, log x, one panel per task (each row: mean ± std over seeds);
    each panel's Pareto front as a line; ``references``: name -> bytes per image, drawn as
    vertical lines (a JPEG of the images) in the panel of the task the name mentions (as a word)."""
    return save_figure(accuracy_vs_bytes_figure(agg, references), path)


def accuracy_vs_bytes_figure(
    agg: pd.DataFrame, references: Mapping[str, float] | None = None
) -> Figure:
    tasks = list(dict.fromkeys(agg["task"]))
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.5 * len(tasks) + 3, 5.5), squeeze=False, sharex=True
    )
    names = list(dict.fromkeys(f"{r.label} [{r.wire_dtype}]" for r in agg.itertuples()))
    cmap = plt.get_cmap("tab20")
    style = {n: (_MARKERS[i % len(_MARKERS)], cmap(i % 20 / 20)) for i, n in enumerate(names)}
    for ax, task in zip(axes[0], tasks, strict=True):
        g = agg[agg["task"] == task]
        for r in g.itertuples():
            name = f"{r.label} [{r.wire_dtype}]"
            marker, color = style[name]
            ax.errorbar(
                r.bytes_per_image,
                100 * r.accuracy,
                yerr=100 * r.accuracy_std,
                fmt=marker,
                color=color,
                ms=6,
                capsize=2,
                label=name,
            )
        fr = g.iloc[pareto_front(list(zip(g["bytes_per_image"], g["accuracy"], strict=True)))]
        ax.plot(fr["bytes_per_image"], 100 * fr["accuracy"], "k--", lw=1, label="Pareto front")
        ax.scatter(fr["bytes_per_image"], 100 * fr["accuracy"], s=140, fc="none", ec="k")
        for name, nbytes in (references or {}).items():
            if f" {task} " in f" {name} ":  # the reference of this task's images
                label = name.replace(f" {task} ", " task ")
                ax.axvline(nbytes, color="0.4", ls="-.", lw=1.2, label=label)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("bytes per image over the link (measured, log)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test accuracy (%)")
    legend: dict[str, Any] = {}  # every panel's entries, once each (a task may lack some rows)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    axes[0][-1].legend(
        legend.values(), legend.keys(), fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5)
    )
    return fig


def plot_accuracy_vs_shots(agg: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (label, _m, dtype, _g), v in agg.groupby(_KEYS, sort=False):
        v = v.groupby("shots").agg(acc=("accuracy", "mean"), std=("accuracy_std", "mean"))
        ax.errorbar(
            v.index,
            100 * v["acc"],
            yerr=100 * v["std"],
            marker="o",
            capsize=2,
            label=f"{label} [{dtype}]",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_compare(
    rows: Sequence[Mapping[str, Any]],
    run_dir: Path,
    header: str = "",
    references: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write the parquet files, the markdown table and the plot(s) into ``run_dir``.

    ``references``: name -> bytes per image of a reference (a JPEG of the same images),
    drawn on the accuracy-vs-bytes plot and listed under the table.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = seeds_frame(rows)
    agg = aggregate(seeds)
    paths = {
        "seeds": run_dir / "compare.parquet",
        "table": run_dir / "compare_summary.parquet",
        "markdown": run_dir / "compare.md",
    }
    for frame, key in ((seeds, "seeds"), (agg, "table")):  # a stop while writing keeps the last
        with atomic_path(paths[key]) as tmp:
            frame.to_parquet(tmp, index=False)
    few = "shots" in agg.columns
    body = fewshot_table(agg) if few else markdown_table(agg)
    if not few:
        for name, nbytes in (references or {}).items():
            body += f"\nReference: {name}, {nbytes:,.0f} bytes per image.\n"
        paired = paired_differences(seeds)
        if not paired.empty:
            body += "\n" + paired_table(paired, choose_wire(paired))
    paths["markdown"].write_text((header + "\n\n" if header else "") + body)
    if few:
        paths["plot"] = plot_accuracy_vs_shots(agg, run_dir / "accuracy_vs_shots.png")
    else:
        paths["plot"] = plot_accuracy_vs_bytes(agg, run_dir / "accuracy_vs_bytes.png", references)
    return paths


def paired_runs(base: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """``other``'s accuracy minus ``base``'s, row by row (label, wire, task), paired by seed.

    Two runs of the same variants that differ in one setting (the cloud's numerics: one run
    with ``--numerics float32``, one with the default): :func:`paired_differences` of each
    of ``other``'s rows against the same row of ``base``.
    """
    tagged = other.assign(label=other["label"] + " [other]")
    both = pd.concat([base, tagged], ignore_index=True)
    out = []
    for (label, wire), _ in base.groupby(["label", "wire_dtype"], sort=False):
        paired = paired_differences(both, reference=(label, wire))
        if paired.empty:
            continue
        mine = paired[(paired["label"] == f"{label} [other]") & (paired["wire_dtype"] == wire)]
        out.append(mine.assign(label=label))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()
