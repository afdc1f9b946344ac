"""`mist-fed bench sim`: what Flower + Ray add per device-round over a plain loop, at two sizes.

For each fleet size (a small one, 50 by default, and the one asked for) the same rounds run
twice against one warm cloud, each as one run session
(:class:`~mist_fed.fleet.runtime.session.RunSession`): the plain loop
(:func:`~mist_fed.fleet.runtime.session.run_plain`: every device in one process, in turn) and
``simulate`` (Flower's simulation runtime on a local Ray; the caller passes
:func:`mist_fed.fleet.flower.simulation.simulate`, so this module imports no Flower). Both
build the initial models and the central reference, and have each device fetch its features
into its own cache, train and evaluate through :func:`~mist_fed.fleet.worker.run_device`; the
global model is scored on the server alike.

* **Overhead per device-round** = (Flower + Ray wall - plain wall) / device-rounds, where each
  wall runs from the start of the session's rounds (initial models, central reference) to the
  last round recorded (the stamps in :attr:`~mist_fed.fleet.rounds.RunRecords.timing`).
* **Ray start-up** (Ray, Flower's runtime and its nodes, until the ServerApp starts
  planning, plus the teardown after its last round) is shown apart, once per run.
* **Marginal overhead**: the same difference between the two sizes, per added device-round
  ((Flower + Ray - plain at N) - (the same at the small size)) / (added device-rounds): what
  a device-round costs once every fixed cost (the Ray workers' first imports among them,
  which fall inside the span above) is paid.
* **Driver peak RSS**: every run is its own child process and reports its own peak RSS
  (``ru_maxrss``, start-up included) and the peak of its RSS sampled every 0.1 s within the
  span above (the rounds, where per-device state would pile up); the embedded cloud lives in
  the parent, so it is in neither, nor are the Ray workers (other processes). The plain
  loop's figures include its devices' training. Growth per added device compares the two
  sizes' Flower + Ray drivers.

The cloud is warmed first (untimed): every image either run will ask for is embedded before
either is timed, so neither pays for the backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mist_fed.device.memory import rss_mb
from mist_fed.fleet.runtime.session import RunResult
from mist_fed.fleet.spec import FleetSpec, apply_overrides

log = logging.getLogger(__name__)

SMALL = 50
ENGINES = ("plain", "flower")


@dataclass
class Measured:
    """One run of one engine at one size, measured in its own process."""

    engine: str
    devices: int
    device_rounds: int  # device-rounds that ran (sampled, not dropped)
    wall_s: float  # planning to the last round (the span both engines share)
    startup_s: float  # Flower + Ray only: start-up and teardown around that span
    total_s: float
    peak_rss_mb: float  # the whole process, start-up included
    span_peak_rss_mb: float  # within the span of ``wall_s`` (sampled every 0.1 s)
    statuses: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _peak_rss_mb() -> float:
    # ru_maxrss, not memory.peak_rss_mb (VmHWM): the devices' memory guards reset VmHWM in the
    # plain loop, and this is the whole process's peak.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


class RssSampler:
    """This process's RSS every ``every_s`` seconds, stamped with ``time.perf_counter()``
    (:func:`~mist_fed.device.memory.rss_mb`): the peak within a span of the run."""

    def __init__(self, every_s: float = 0.1) -> None:
        import threading

        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_mb()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> float:
        inside = [mb for t, mb in self.samples if start <= t <= end]
        return max(inside, default=float("nan"))


Simulate = Callable[..., RunResult]  # mist_fed.fleet.flower.simulation.simulate


def _measure(
    engine: str,
    spec: FleetSpec,
    location: str,
    simulate: Simulate,
    ray_address: str | None,
    ray_cpus: int | None,
    verbose: int,
) -> Measured:
    """Run ``spec`` once on ``engine``; called in a fresh child process."""
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from mist_fed.fleet.runtime.session import run_plain

    with RssSampler() as rss:
        if engine == "plain":
            result = run_plain(spec, None, cloud=location)
        else:
            result = simulate(
                spec, None, cloud=location, ray_address=ray_address, ray_cpus=ray_cpus,
                progress=False, verbose=verbose,
            )  # fmt: skip
    rec = result.records
    span = (rec.timing["start"], rec.timing["end"])
    wall = span[1] - span[0]
    ran = [r for r in rec.devices if r["status"] != "dropped"]
    return Measured(
        engine=engine,
        devices=spec.num_devices,
        device_rounds=len(ran),
        wall_s=wall,
        startup_s=result.wall_s - wall if engine != "plain" else 0.0,
        total_s=result.wall_s,
        peak_rss_mb=_peak_rss_mb(),
        span_peak_rss_mb=rss.peak(*span),
        statuses=dict(Counter(r["status"] for r in rec.devices)),
        reasons=sorted({r["reason"][:80] for r in rec.devices if r["reason"]})[:3],
    )


def measure_apart(
    engine: str,
    spec: FleetSpec,
    location: str,
    simulate: Simulate,
    ray_address: str | None = None,
    ray_cpus: int | None = None,
    verbose: int = 0,
) -> Measured:
    """:func:`_measure` in a fresh (spawned) process: its peak RSS is that run's alone."""
    ctx = mp.get_context("spawn")
    args = (engine, spec, location, simulate, ray_address, ray_cpus, verbose)
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_measure, args)


def warm_cloud(specs: list[FleetSpec], location: str) -> int:
    """Have the cloud embed every image the runs of ``specs`` will ask for (devices' shares
    and the server's evaluation images) with its ``warm`` action; untimed.
    Returns the number of distinct images asked for."""
    from mist_fed.core.methods import method_gather
    from mist_fed.device.source import FlightSource
    from mist_fed.fleet.plan import plan_fleet

    wanted: dict[tuple[str, str, int | None, str, str], set[str]] = {}
    for spec in specs:
        plan = plan_fleet(spec)
        for d in plan.devices:
            key = (d.task, d.method, spec.k, spec.wire_dtype)
            wanted.setdefault((*key, "train"), set()).update(d.train_ids)
            wanted.setdefault((*key, "test"), set()).update(d.test_ids)
            wanted[(*key, "test")].update(plan.eval_ids[d.task])
    with FlightSource(location) as src:
        blocks = src.geometry().num_blocks
        for (task, method, k, dtype, split), ids in wanted.items():
            g = method_gather(method, blocks, k)
            src.client.warm(task, split, [(g.kind, g.k, dtype)], ids=sorted(ids))
    return len({(key[0], key[-1], i) for key, ids in wanted.items() for i in ids})


@dataclass
class BenchResult:
    runs: list[Measured]
    distinct_images: int = 0
    cloud: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per size: both engines side by side, the overhead and the RSS growth."""
        by = {(m.devices, m.engine): m for m in self.runs}
        sizes = sorted({m.devices for m in self.runs})
        out: list[dict[str, Any]] = []
        for n in sizes:
            plain, flower = by[(n, "plain")], by[(n, "flower")]
            dr = flower.device_rounds
            row: dict[str, Any] = {
                "devices": n,
                "device-rounds": dr,
                "ok plain": plain.statuses.get("ok", 0),
                "ok flower": flower.statuses.get("ok", 0),
                "plain s": plain.wall_s,
                "flower+ray s": flower.wall_s,
                "ray start/stop s": flower.startup_s,
                "overhead ms/dev-round": (flower.wall_s - plain.wall_s) / dr * 1e3
                if dr
                else float("nan"),
                "driver peak MB": flower.peak_rss_mb,
                "driver rounds peak MB": flower.span_peak_rss_mb,
                "plain peak MB": plain.peak_rss_mb,
                "MB/added device": float("nan"),
                "rounds MB/added device": float("nan"),
                "marginal ms/added dev-round": float("nan"),
            }
            if out:
                first = out[0]
                added = n - first["devices"]
                row["MB/added device"] = (flower.peak_rss_mb - first["driver peak MB"]) / added
                row["rounds MB/added device"] = (
                    flower.span_peak_rss_mb - first["driver rounds peak MB"]
                ) / added
                extra = (flower.wall_s - plain.wall_s) - (first["flower+ray s"] - first["plain s"])
                more = dr - first["device-rounds"]
                if more > 0:
                    row["marginal ms/added dev-round"] = extra / more * 1e3
            out.append(row)
        return out

    def lines(self) -> list[str]:
        """The printed report: the table, then what each run's devices did, the cloud's counts."""
        import pandas as pd

        from mist_fed.report.results import format_table

        out = [format_table(pd.DataFrame(self.rows())), ""]
        for m in self.runs:
            reasons = f" {m.reasons}" if m.reasons else ""
            out.append(f"* {m.engine} x {m.devices}: device-rounds {m.statuses}{reasons}")
        embedded = self.cloud.get("images_embedded")
        out.append(
            f"* cloud: {embedded} images embedded in all for {self.distinct_images} distinct "
            f"images asked for (warmed before timing); cache hits {self.cloud.get('cache_hits')}"
        )
        return out


def bench_sim(
    spec: FleetSpec,
    simulate: Simulate,
    small: int = SMALL,
    cloud: str | None = None,
    ray_address: str | None = None,
    ray_cpus: int | None = None,
    verbose: int = 0,
) -> BenchResult:
    """Both engines at ``small`` devices and at ``spec``'s size, against one warm cloud."""
    from mist_fed.fleet.runtime.provision import cloud_service

    sizes = sorted({min(small, spec.num_devices), spec.num_devices})
    specs = [spec if n == spec.num_devices else apply_overrides(spec, devices=n) for n in sizes]
    runs: list[Measured] = []
    with cloud_service(spec, cloud) as (location, stats):
        t = time.perf_counter()
        distinct = warm_cloud(specs, location)
        warm_s = time.perf_counter() - t
        log.info("cloud warm for %d distinct images (%.1f s, untimed)", distinct, warm_s)
        for s in specs:
            for engine in ENGINES:
                log.info("%s: %d devices x %d rounds", engine, s.num_devices, s.rounds)
                m = measure_apart(engine, s, location, simulate, ray_address, ray_cpus, verbose)
                log.info("%s: %s", engine, dataclasses.asdict(m))
                runs.append(m)
        cloud_stats = stats()
    return BenchResult(runs, distinct, cloud_stats)
