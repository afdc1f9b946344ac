"""`mist-fed simulate`: a fleet of virtual edge devices on Flower's Ray backend (also
``python simulations/run.py``), and `mist-fed bench sim`: its overhead against a plain loop."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.commands.common import add_cloud_token_arg, read_cloud_token
from mist_fed.wire.dtypes import WIRE_HELP, wire_arg

DEFAULT_FLEET = Path(__file__).resolve().parents[2] / "simulations" / "fleets" / "default.toml"


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fleet", default=str(DEFAULT_FLEET), help="fleet spec TOML (default: %(default)s)"
    )
    p.add_argument(
        "--devices", type=int, help="the population: devices in all, spread over the fleets"
    )
    p.add_argument(
        "--per-round", type=int, help="devices each fleet samples a round among the available"
    )
    p.add_argument(
        "--profile", help="profile mix: `rpi4` or `rpi4:30,phone-low:20` (or .toml paths)"
    )
    p.add_argument("--tasks", help="comma-separated tasks, one fleet each (replaces the spec's)")
    p.add_argument("--method", choices=["mist", "mist_pool", "linear", "partial1", "side"])
    p.add_argument(
        "--aggregation",
        help="a Flower strategy (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, "
        "FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan), an asynchronous one (FedBuff, "
        "FedAsync: rounds count server steps; docs/fleets.md), any case, or local",
    )
    p.add_argument(
        "--aggregation-args",
        help="the strategy's keyword arguments as JSON, e.g. '{\"eta\": 0.01}' or "
        '\'{"buffer_size": 10, "max_concurrency": 50}\'',
    )
    p.add_argument(
        "--protocol", choices=["vtab-1k", "full"], help="the task's training split devices share"
    )
    p.add_argument(
        "--partitioner",
        help="a Flower Datasets partitioner (Iid, Dirichlet, InnerDirichlet, Pathological, "
        "Shard, Linear, Square, Exponential; any case)",
    )
    p.add_argument(
        "--partitioner-args", help="its keyword arguments as JSON, e.g. '{\"alpha\": 0.3}'"
    )
    p.add_argument(
        "--availability", help="always | dropout:P | diurnal[:HOURS] | trace:PATH (docs/fleets.md)"
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay", type=float, help="per-round factor on the devices' lr")
    p.add_argument("--batch-size", type=int, help="devices' (and the central reference's) batch")
    p.add_argument("--k", type=int, help="gather depth for mist (-1: all blocks)")
    p.add_argument("--wire-dtype", type=wire_arg, help=WIRE_HELP)
    p.add_argument("--deadline-s", type=float, help="round deadline in device seconds")
    p.add_argument(
        "--train-per-device",
        type=int,
        help="partition only devices x N images of the split (0: all of it)",
    )
    p.add_argument("--test-per-device", type=int)
    p.add_argument(
        "--eval-images", type=int, help="test images the global and central models are scored on"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--cloud", help="use a running cloud (grpc://host:port); default: embedded")
    p.add_argument(
        "--ray-address", help="run the devices on a running Ray cluster (HEAD:6379; see README)"
    )
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: min(cores, 4))")


def load_spec(args: argparse.Namespace) -> Any:
    from mist_fed.fleet.spec import OVERRIDES, apply_overrides, load_fleet

    spec = load_fleet(args.fleet)
    return apply_overrides(spec, **{k: getattr(args, k, None) for k in OVERRIDES})


def resume_spec(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--resume RUN_ID``: the run's own spec and checkpoint; fleet flags are refused (the
    spec is the run's, as ``results/RUN_ID/config.toml`` recorded it)."""
    from mist_fed.errors import ConfigError
    from mist_fed.fleet.runtime.resume import open_run
    from mist_fed.fleet.spec import OVERRIDES

    given = [k for k in OVERRIDES if getattr(args, k, None) is not None]
    if args.fleet != str(DEFAULT_FLEET):
        given.insert(0, "fleet")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(
            f"--resume continues run {args.resume} with its own recorded spec; leave out {flags}"
        )
    return open_run(args.results, args.resume)


def run(args: argparse.Namespace) -> int:
    from mist_fed.fleet.flower.simulation import simulate
    from mist_fed.report.results import fleet_frame, format_table, summary_table

    spec, resume = resume_spec(args) if args.resume else (load_spec(args), None)
    result = simulate(
        spec,
        args.results,
        resume=resume,
        run_id=args.run_id,
        cloud=args.cloud,
        ray_address=args.ray_address,
        ray_cpus=args.ray_cpus,
        cloud_bind=args.cloud_bind,
        cloud_advertise=args.cloud_advertise,
        progress=not args.no_progress,
        verbose=args.verbose,
        cloud_token=read_cloud_token(args.cloud_token_file),
    )
    print(format_table(summary_table(fleet_frame(result.records.fleets))))
    print(f"\n{result.wall_s:.1f} s wall; results in {result.run_dir}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Flower + Ray against a plain loop at two fleet sizes: the overhead per device-round,
    Ray's start-up apart, and the driver's peak RSS (`mist_fed.fleet.runtime.sim_bench`)."""
    import dataclasses

    from mist_fed.fleet.flower.simulation import simulate
    from mist_fed.fleet.runtime.provision import resolve_assets
    from mist_fed.fleet.runtime.sim_bench import bench_sim

    spec = resolve_assets(load_spec(args))
    if args.population:
        return _bench_population(args, spec)
    result = bench_sim(
        spec,
        simulate,
        small=args.small,
        cloud=args.cloud,
        ray_address=args.ray_address,
        ray_cpus=args.ray_cpus,
        verbose=max(0, args.verbose - 1),  # -v: the bench's progress; -vv: the runs' logs too
    )
    _report(args.out, result.lines(), {
        "spec": {"fleet": args.fleet, "devices": spec.num_devices, "rounds": spec.rounds},
        "rows": result.rows(),
        "runs": [dataclasses.asdict(m) for m in result.runs],
        "distinct_images": result.distinct_images,
        "cloud": result.cloud,
    })  # fmt: skip
    ok = all(set(m.statuses) <= {"ok"} for m in result.runs)
    return 0 if ok else 1


def _bench_population(args: argparse.Namespace, spec: Any) -> int:

    from mist_fed.errors import ConfigError
    from mist_fed.fleet.flower.simulation import simulate
    from mist_fed.fleet.runtime.population_bench import bench_population

    try:
        sizes = [int(n) for n in args.population.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(
            f"--population takes sizes like 1000,100000, got {args.population!r}"
        ) from None
    engines = tuple(e for e in args.engines.split(",") if e)
    if not sizes or not set(engines) <= {"plain", "flower"}:
        raise ConfigError("give --population 1000,100000 and --engines plain,flower")
    result = bench_population(
        spec, sizes, simulate, engines, cloud=args.cloud, ray_cpus=args.ray_cpus,
        verbose=max(0, args.verbose - 1),
    )  # fmt: skip
    _report(args.out, result.lines(), {
        "rows": result.rows(), "ratios": result.ratios(), "cloud": result.cloud
    })  # fmt: skip
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="a fleet of virtual edge devices on Flower + Ray")
    add_fleet_args(p)
    add_cloud_token_arg(p)
    p.add_argument("--results", default="results", help="results directory (default: %(default)s)")
    p.add_argument("--run-id", help="name of the run's folder (default: fleet-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue the stopped or killed run RUN_ID (a folder of --results) from its last "
        "completed round, with its own recorded spec (no fleet flags)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--cloud-bind",
        default=DEFAULT_HOST,
        metavar="HOST",
        help="where the embedded cloud listens (default: %(default)s; 0.0.0.0 lets devices on "
        "other machines of a Ray cluster reach it)",
    )
    p.add_argument(
        "--cloud-advertise",
        metavar="HOST",
        help="the host devices dial for the embedded cloud (default: the bind host; for "
        "0.0.0.0 this machine's IP as Ray names its nodes)",
    )
    p.set_defaults(handler=run)


def add_bench_parser(bsub: Any) -> None:
    """`mist-fed bench sim`, registered by the bench command."""
    b = bsub.add_parser(
        "sim", help="simulation overhead at two fleet sizes: Flower + Ray vs a plain loop"
    )
    add_fleet_args(b)
    b.add_argument(
        "--small",
        type=int,
        default=50,
        help="the smaller fleet measured beside --devices (default: %(default)s)",
    )
    b.add_argument(
        "--population",
        help="instead: the driver's peak RSS at these populations (e.g. 1000,100000) with the "
        "fleet's per_round (simulations/fleets/population.toml)",
    )
    b.add_argument(
        "--engines", default="plain,flower", help="population case: plain, flower or both"
    )
    b.add_argument("--out", help="also write table.md and bench.json into this directory")
    b.set_defaults(handler=bench)


def _report(out_dir: str | None, lines: list[str], data: dict[str, Any]) -> None:
    """Print a bench's table; with ``out_dir``, write it (``table.md``) and ``bench.json``."""
    import json

    print("\n".join(lines))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("\n".join(lines) + "\n")
        (out / "bench.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nwritten to {out}")
