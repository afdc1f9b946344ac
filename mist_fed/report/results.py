"""The results of a fleet run on disk: ``results/<run-id>/``.

* ``devices.parquet``: one row per device per round (:data:`DEVICE_COLUMNS` first),
* ``fleets.parquet``: one row per task fleet per round (:class:`FleetRow`),
* ``config.toml``: the resolved fleet spec (rerun with ``--fleet results/<id>/config.toml``)
  and, under ``[run]``, how this run was made (never read back as spec),
* ``summary.md``: the final-round table, what its columns mean, one line per fleet on its gap
  to the central reference and its simulated time to 95% of its final accuracy, then run facts.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
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
    "num_examples",
    "feature_bytes",
    "images_down",
    "received_digest",
    "node",
    "staleness",
    "sim_start_s",
    "sim_end_s",
)


@dataclass
class FleetRow:
    """One row of ``fleets.parquet``: one task fleet in one round (the leading fields are the
    columns summaries read first)."""

    round: int
    fleet: str
    task: str
    method: str
    aggregation: str
    devices: int
    sampled: int
    ok: int
    failed: int
    dropped: int
    stragglers: int
    accuracy: float  # the global model on the server's evaluation images (local: devices' own)
    central_accuracy: float
    eval_images: int
    sample_steps: int  # rows x epochs the fleet's devices trained so far
    central_sample_steps: int
    round_time_s: float  # simulated: the slowest participating device, capped by the deadline
    sim_time_s: float  # simulated time so far
    device_hours: float
    sim_device_hours: float
    bytes_down: int
    bytes_up: int
    bytes_per_image: float
    transfer_s: float  # mean over the round's ok devices
    compute_s: float
    peak_mem_mb: float
    train_slots: int  # the devices' training images counted per device ...
    train_images: int  # ... and distinct
    mean_device_accuracy: float
    feature_bytes: int
    images_down: int
    # asynchronous fleets (FedBuff, FedAsync): each row is a server step; the staleness (server
    # steps since the model a device trained from) of the updates it consumed; NaN otherwise
    staleness_mean: float = math.nan
    staleness_max: float = math.nan


FLEET_COLUMNS = tuple(f.name for f in fields(FleetRow))
# Columns that hold text; any other missing column is filled with NaN (a float column).
TEXT_COLUMNS = frozenset(
    {f.name for f in fields(FleetRow) if f.type == "str"}
    | {"profile", "status", "reason", "received_digest", "node"}
)
# The aggregation of a fleet whose devices keep their own models (mist_fed.fleet.aggregation).
LOCAL = "local"
# The layout of the results tables: bump it when a column changes meaning. A run checkpointed
# under another layout is not resumed (mist_fed.fleet.runtime.resume).
SCHEMA_VERSION = 1


def schema_id() -> str:
    """:data:`SCHEMA_VERSION` and a digest of the tables' columns (a column added, renamed or
    moved changes it even where the version was not bumped)."""
    columns = "|".join((*DEVICE_COLUMNS, "/", *FLEET_COLUMNS))
    return f"{SCHEMA_VERSION}-{hashlib.sha256(columns.encode()).hexdigest()[:12]}"


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.10 h``: a simulated duration in the unit that reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


T_FRACTION = 0.95  # the share of the final accuracy that ``t95 min`` waits for


def new_run_id(prefix: str = "fleet") -> str:
    return f"{prefix}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def _frame(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> pd.DataFrame:
    """The rows as a frame, ``first`` leading; a column no row has (an older run) is added,
    empty: missing text, or NaN."""
    df = pd.DataFrame(list(rows))
    for c in first:
        if c not in df.columns:
            df[c] = pd.NA if c in TEXT_COLUMNS else math.nan
    return df[list(first) + [c for c in df.columns if c not in first]]


def device_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    return _frame(rows, DEVICE_COLUMNS)


def fleet_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    return _frame(rows, FLEET_COLUMNS)


def numeric(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as floats: NaN where the column is missing or a value is not a number."""
    if column not in df.columns:
        return pd.Series(math.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def _reaching(fleet_rows: pd.DataFrame, fraction: float) -> pd.Series | None:
    """The first round (a row) whose accuracy is at least ``fraction`` of the last round's;
    None when there is no row or the last round's accuracy is NaN."""
    rows = fleet_rows.sort_values("round", kind="stable").reset_index(drop=True)
    acc = numeric(rows, "accuracy")
    if rows.empty or math.isnan(acc.iloc[-1]):
        return None
    hit = (acc >= fraction * acc.iloc[-1]).to_numpy()  # NaN compares False
    if not hit.any():
        return None
    # sim_time_s as floats (NaN when an older run has none) for time_to_fraction
    return rows.assign(sim_time_s=numeric(rows, "sim_time_s")).iloc[int(hit.argmax())]


def time_to_fraction(fleet_rows: pd.DataFrame, fraction: float = T_FRACTION) -> float:
    """Simulated seconds until one fleet first reached ``fraction`` of its final accuracy.

    ``fleet_rows`` are one fleet's rows of ``fleets.parquet``; the answer is the cumulative
    ``sim_time_s`` of the first round whose accuracy is at least ``fraction`` x the last
    round's accuracy. NaN when the last round's accuracy is NaN, or the rows have no
    ``sim_time_s`` (an older run)."""
    row = _reaching(fleet_rows, fraction)
    return math.nan if row is None else float(row["sim_time_s"])


def time_to_accuracy(fleet_rows: pd.DataFrame, target: float) -> float:
    """Simulated seconds until one fleet's accuracy first reached ``target`` (NaN: never)."""
    rows = fleet_rows.sort_values("round", kind="stable")
    hit = (numeric(rows, "accuracy") >= target).to_numpy()
    return float(numeric(rows, "sim_time_s").iloc[int(hit.argmax())]) if hit.any() else math.nan


def _hours(seconds: float) -> str:
    """Simulated hours to three significant digits (short runs last a fraction of one)."""
    return "-" if math.isnan(seconds) else f"{seconds / 3600:.3g}"


def tta_table(fleets: pd.DataFrame) -> pd.DataFrame:
    """Each fleet's simulated hours to a common target of its task: the lowest final accuracy
    among the task's fleets (every fleet of the task reached it), beside its total hours."""
    if fleets.empty:
        return pd.DataFrame()
    rows = []
    for _, t in fleets.sort_values("round", kind="stable").groupby("task", sort=False):
        finals = {
            n: float(numeric(g, "accuracy").iloc[-1]) for n, g in t.groupby("fleet", sort=False)
        }
        target = min((a for a in finals.values() if not math.isnan(a)), default=math.nan)
        for name, g in t.groupby("fleet", sort=False):
            rows.append({
                "fleet": name, "agg": g["aggregation"].iloc[-1], "steps": int(g["round"].iloc[-1]),
                "accuracy": finals[name], "target": target,
                "h to target": _hours(time_to_accuracy(g, target)),
                "h to 95%": _hours(time_to_fraction(g)),
                "sim h": _hours(float(numeric(g, "sim_time_s").iloc[-1])),
                "staleness": float(numeric(g, "staleness_mean").mean()),
            })  # fmt: skip
    return pd.DataFrame(rows)


def summary_table(fleets: pd.DataFrame) -> pd.DataFrame:
    """The table a reader wants first: each fleet's last round, with totals over the run."""
    if fleets.empty:
        return pd.DataFrame()
    fleets = fleets.sort_values("round", kind="stable")
    last = fleets.groupby("fleet", sort=False).tail(1).set_index("fleet")
    total = fleets.assign(
        **{
            c: numeric(fleets, c)
            for c in (
                "feature_bytes",
                "images_down",
                "bytes_down",
                "bytes_up",
                "transfer_s",
                "compute_s",
                "peak_mem_mb",
            )
        }
    ).groupby("fleet", sort=False)
    accuracy, central = numeric(last, "accuracy"), numeric(last, "central_accuracy")
    t95 = pd.Series(
        {name: time_to_fraction(g) for name, g in fleets.groupby("fleet", sort=False)},
        dtype=float,
    )
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
            "accuracy": accuracy,
            "central": central,
            "gap": (accuracy - central) * 100,
            "t95 min": t95 / 60,
            "sim min": numeric(last, "sim_time_s") / 60,
            "dev-h": numeric(last, "sim_device_hours"),
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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def gap_lines(fleets: pd.DataFrame, fraction: float = T_FRACTION) -> list[str]:
    """One line per fleet: its final accuracy against its central reference, and the
    simulated time until it first reached ``fraction`` of its final accuracy."""
    lines = []
    for name, g in fleets.sort_values("round", kind="stable").groupby("fleet", sort=False):
        last = g.iloc[-1]
        acc = float(numeric(g, "accuracy").iloc[-1])
        central = float(numeric(g, "central_accuracy").iloc[-1])
        images = float(numeric(g, "eval_images").iloc[-1])
        local = last.get("aggregation") == LOCAL
        head = f"* {name} ({last.get('aggregation')}): "
        if math.isnan(acc):
            lines.append(head + "no accuracy in the last round")
            continue
        n = "" if math.isnan(images) else f" {images:.0f}"
        if math.isnan(central):
            text = f"{_pct(acc)}, no central reference"
        else:
            pairing = f"not paired: the devices' own{n}" if local else f"paired on{n}"
            text = (
                f"{_pct(acc)} vs central {_pct(central)} (gap {100 * (acc - central):+.1f}"
                f" points, {pairing} test images)"
            )
        row = _reaching(g, fraction)
        if row is not None:
            rounds = f"round {row['round']} of {last['round']}"
            t = float(row["sim_time_s"])
            when = f"at {rounds}" if math.isnan(t) else f"after {duration(t)} simulated ({rounds})"
            text += f"; {fraction:.0%} of final accuracy {when}"
        lines.append(head + text)
    return lines


def shared_images(fleets: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Each fleet whose devices share training images (more slots than images): its
    ``train_slots`` and ``train_images``."""
    if fleets.empty or "train_slots" not in fleets:
        return {}
    shared = {}
    for name, g in fleets.groupby("fleet", sort=False):
        slots, images = numeric(g, "train_slots").iloc[-1], numeric(g, "train_images").iloc[-1]
        if slots > images > 0:
            shared[str(name)] = {"train_slots": int(slots), "train_images": int(images)}
    return shared


def sharing_lines(shared: Mapping[str, Mapping[str, int]]) -> list[str]:
    """One line per fleet of :func:`shared_images`."""
    return [
        f"* {name}: devices share images: {n['train_slots']:,} slots over {n['train_images']:,}"
        f" images (each image on {n['train_slots'] / n['train_images']:.1f} devices on average;"
        " a device's own images are distinct)"
        for name, n in shared.items()
    ]


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
    shared = shared_images(fl)
    if shared:
        config["run"]["shared_images"] = shared
    paths["config"].write_text(header + tomli_w.dumps(config))
    lines = [
        f"# Fleet run `{run_dir.name}`",
        "",
        format_table(summary_table(fl)),
        "",
        "Accuracy: last round. Federated fleets (`agg` a Flower strategy): the global model",
        "scored on the server on N test images of the task (a seeded sample, the same in every",
        "round and for every fleet of the task; N is in the lines below). Local fleets (`agg`",
        "local): each device's own model on its own test images, weighted by their number.",
        "`central`: the fleet's edge net trained centrally on the union of its devices' training",
        "images for the same sample-steps, scored on the server's evaluation images; `gap` =",
        "accuracy - central, in points. For federated fleets the two are paired (the same",
        "images); for local fleets they are not (the devices' own test images against the",
        "server's).",
        "",
        "Simulated time (a FedScale-style virtual clock): a round lasts as long as its slowest",
        "device that ran (transfer + compute, capped at the deadline). `sim min` sums the",
        "rounds (minutes), `dev-h` sums every device's transfer + compute over the run in hours",
        f"(dropped devices excluded), `t95 min` is the simulated time until the fleet first reached {T_FRACTION:.0%}",
        "of its final accuracy. KB/image: feature bytes streamed per image; MB down also counts the",
        "weights each device receives every round. Device times are seconds (transfer from the",
        "profile's link, compute measured here and scaled to the device).",
        "",
        "## Federated gap and time to accuracy",
        "",
        *(gap_lines(fl) or ["(no rows)"]),
        "",
        "## Time to accuracy in simulated hours",
        "",
        format_table(tta_table(fl)),
        "",
        "`target`: the lowest final accuracy among the fleets of the task (each reached it);",
        "`h to target`: simulated hours until a fleet's global model first scored at least that;",
        "`steps`: rounds, or server steps of an asynchronous fleet (FedBuff, FedAsync, whose",
        "clock is its event time: a step happens when the update that fills its buffer ends);",
        "`staleness`: the mean over steps of the server steps between an update's model and the",
        "step that took it (asynchronous fleets; `-` otherwise).",
        "",
        *(["## Shared images", "", *sharing_lines(shared), ""] if shared else []),
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
