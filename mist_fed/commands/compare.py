"""`mist-fed compare` and ``python simulations/compare.py``: the paper's Table 1 through the
pipeline: flags -> :class:`~mist_fed.experiments.compare.CompareConfig` -> results files.

The real parser (:func:`parser`) is built only when ``compare`` is the command: its imports
(datasets, the trainer, pandas) take seconds that the other commands should not pay, so they
are made inside the functions below.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mist_fed.assets.defaults import STUDIED_WIRE, STUDIED_WIRE_SOURCE
from mist_fed.errors import ConfigError, MistError

if TYPE_CHECKING:
    from mist_fed.experiments.compare import CompareConfig

ARGV = "compare_argv"

log = logging.getLogger("mist_fed.compare")

FEW_SHOT_LABELS = ("linear", "gather_linear", "mist")
SYNTHETIC = "synthetic:classes=4,train=64,val=16,test=32"


def default_tasks() -> list[str]:
    """The offline real task when its data is here, else a synthetic task."""
    from mist_fed.assets.defaults import default_task
    from mist_fed.data import task_entry

    name = default_task()
    return [name] if task_entry(name).availability().available else [SYNTHETIC]


def parser() -> argparse.ArgumentParser:
    from mist_fed.cloud.numerics import NUMERICS_CHOICES, NUMERICS_HELP
    from mist_fed.data import SHOTS
    from mist_fed.experiments.compare import DEFAULT_PROFILE
    from mist_fed.wire.dtypes import WIRE_HELP, wire_arg

    p = argparse.ArgumentParser(description="separated-tuning methods through the pipeline")
    p.add_argument("--tasks", nargs="+", help="task specs (default: the offline real task)")
    p.add_argument("--backbone", help="backbone name (default: mist_fed.assets.defaults)")
    p.add_argument("--random-init", action="store_true", help="random backbone (tests, demos)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 1; 3 with --few-shot)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=0, help="0 = the whole batch")
    p.add_argument("--train-limit", type=int, help="first N train images (default all 800)")
    p.add_argument("--val-limit", type=int, help="first N val images (default all 200)")
    p.add_argument("--test-limit", type=int, default=1000, help="first N test images")
    p.add_argument("--methods", nargs="+", help="row labels to run (default: every row)")
    p.add_argument(
        "--wire",
        nargs="*",
        type=wire_arg,
        default=["float16", "int8", "int8ch", STUDIED_WIRE],
        help=f"MIST's extra wire dtypes (default float16 int8 int8ch {STUDIED_WIRE}, the last "
        f"chosen by {STUDIED_WIRE_SOURCE}): {WIRE_HELP}",
    )
    p.add_argument(
        "--mist-k",
        type=int,
        help="fix MIST's k instead of selecting it on val (skips the k rows): paired wire checks",
    )
    p.add_argument(
        "--few-shot",
        nargs="*",
        type=int,
        metavar="SHOTS",
        help=f"few-shot mode (default shots {SHOTS}), train drawn from the train split",
    )
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"the edge device every row runs on: a profile name ({', '.join(_profiles())}) "
        f"or a .toml path (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--device-dir",
        help="the device's storage, its feature cache (default <MIST_FED_CACHE>/compare/<run-id>: "
        "a rerun or --resume of the run downloads nothing)",
    )
    p.add_argument(
        "--cache-dir", help="the cloud's feature store (default <MIST_FED_CACHE>/features)"
    )
    p.add_argument(
        "--numerics",
        choices=NUMERICS_CHOICES,
        default="auto",
        help=f"{NUMERICS_HELP} (default auto); run twice, float32 and the default, for a paired check",
    )
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--run-id")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run --run-id: keep its rows, run only the rows it lacks (rows are written "
        "as each ends, so a run stopped midway loses at most the row it was training)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def numerics_line(numerics: str) -> str:
    """What the comparison's cloud runs the backbone in, resolved on this host."""
    from mist_fed.cloud.config import ServeConfig

    return ServeConfig(numerics=numerics).backbone_numerics()[2]


def _profiles() -> list[str]:
    from mist_fed.device.profiles import list_profiles

    try:
        return list_profiles()
    except MistError:
        return []


def config_from_args(args: argparse.Namespace, run_id: str = "default") -> CompareConfig:
    """The run's config; the device directory defaults to one per ``run_id``."""
    from mist_fed.assets.defaults import default_backbone
    from mist_fed.data import SHOTS
    from mist_fed.experiments.compare import CompareConfig, default_device_dir, default_variants

    few = tuple(args.few_shot or SHOTS) if args.few_shot is not None else ()
    variants = default_variants(args.wire)
    labels = args.methods or (FEW_SHOT_LABELS if few else None)
    if labels:
        variants = [v for v in variants if v.label in labels or v.label.split(" ")[0] in labels]
    if args.mist_k is not None:
        variants = [v for v in variants if v.group != "k"]
    return CompareConfig(
        tasks=tuple(args.tasks or default_tasks()),
        backbone=args.backbone or default_backbone(),
        random_init=args.random_init,
        seeds=args.seeds or (3 if few else 1),
        epochs=args.epochs,
        micro_batch=args.micro_batch,
        batch_size=args.batch_size,
        limits={"train": args.train_limit, "val": args.val_limit, "test": args.test_limit},
        variants=tuple(variants),
        few_shot=few,
        mist_k=args.mist_k,
        cache_dir=args.cache_dir,
        profile=args.profile,
        device_dir=args.device_dir or str(default_device_dir(run_id)),
        numerics=args.numerics,
    )


def resumed_rows(run_dir: Path) -> list[dict[str, Any]]:
    """An earlier run's rows (``compare.parquet``, written as each row ends): a resumed run
    keeps them and runs only the rows they lack."""
    path = run_dir / "compare.parquet"
    if not path.exists():
        raise ConfigError(f"--resume: {path} does not exist; give the --run-id of an earlier run")
    import pandas as pd

    frame = pd.read_parquet(path)
    if "bytes_per_image" not in frame.columns or "seed" not in frame.columns:
        raise ConfigError(
            f"--resume: {path} was written by an earlier version of the comparison (no "
            "bytes_per_image column); start a new --run-id"
        )
    rows = [{str(k): v for k, v in r.items()} for r in frame.to_dict("records")]
    log.info("resuming %s: %d rows of the earlier run kept", run_dir, len(rows))
    return rows


def main(argv: Sequence[str] | None = None, prog: str = "python simulations/compare.py") -> int:
    """Run the comparison; ``prog`` is how the command line in compare.md's header starts."""
    from mist_fed.experiments.compare import run_compare
    from mist_fed.experiments.jpeg import JPEG_QUALITY, jpeg_bytes_per_image
    from mist_fed.experiments.rows import RowResult
    from mist_fed.report.comparison import write_compare
    from mist_fed.report.results import new_run_id

    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    for noisy in ("mist_fed.cloud", "mist_fed.wire"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mist_fed.cloud.embed").setLevel(logging.INFO)  # warm's embedding progress
    try:
        run_id = args.run_id or new_run_id("compare")
        cfg = config_from_args(args, run_id)
        run_dir = args.out / run_id
        rows = resumed_rows(run_dir) if args.resume else []
        kept = f"; resumed: {len(rows)} rows of the earlier run kept" if args.resume else ""

        jpeg = {
            f"224-px JPEG (quality {JPEG_QUALITY}) of the {t} test images": jpeg_bytes_per_image(
                t, "test", cfg.limits.get("test")
            )
            for t in cfg.tasks
        }

        def on_row(r: RowResult) -> None:  # write as we go: a long run leaves partial results
            rows.append(r.as_dict())
            write_compare(rows, run_dir, header, jpeg)

        command = f"{prog} " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        header = (
            f"# Separated tuning through the pipeline\n\n`{command.strip()}`\n\n"
            f"backbone `{cfg.backbone}` ({numerics_line(cfg.numerics)}), {cfg.seeds} seed(s), {cfg.epochs} epochs of batch {cfg.batch_size}, limits "
            f"{ {k: v for k, v in cfg.limits.items() if v} }"
            + (f", MIST k fixed at {cfg.mist_k}" if cfg.mist_k else "")
            + kept
            + f"; every row one job of an edge device with profile `{cfg.profile}` (features "
            "streamed batch by batch from its on-device cache); accuracy in % (mean ± std over "
            "seeds); MB/img = bytes the features cost over the link per image; edge peak = the "
            "job's peak RSS rise (training and evaluation); device s = the job's compute time "
            f"scaled to the `{cfg.profile}` profile."
        )
        run_compare(cfg, on_row, prior=rows)
        paths = write_compare(rows, run_dir, header, jpeg)
    except MistError as e:
        log.error("%s", e)
        return 2
    print(paths["markdown"].read_text())
    log.info("results in %s", run_dir)
    return 0


class _CompareParser(argparse.ArgumentParser):
    """Stands in for :func:`parser` and hands the parsing over to it on first use."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        real = parser()
        real.prog = self.prog
        ns, rest = real.parse_known_args(args, namespace)  # --help prints and exits here
        setattr(ns, ARGV, list(args or []))
        ns.handler = run
        return ns, rest


def run(args: argparse.Namespace) -> int:
    # `mist-fed` configured logging (WARNING) before main's own basicConfig, which is then a
    # no-op: give the run main's levels, INFO (progress) or DEBUG with -v.
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return main(getattr(args, ARGV), prog="mist-fed compare")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        add_help=False,  # --help is the compare parser's own
        help="the paper's methods side by side through the pipeline (simulations/compare.py)",
    )
    p.__class__ = _CompareParser  # add_parser takes no parser class of its own
