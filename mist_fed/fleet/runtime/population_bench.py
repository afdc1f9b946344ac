"""`mist-fed bench sim --population 1000,100000`: the driver's peak RSS against the population.

The same fleet spec (``simulations/fleets/population.toml``: a synthetic task's full training
split, Dirichlet labels, ``per_round`` devices a round, no central reference) runs at each
population size, each run in its own spawned process (:func:`~.sim_bench.measure_apart`:
its ``ru_maxrss`` is that run's alone; the embedded cloud lives in the parent), on one or both
engines: the plain loop (every sampled device in the driver, in turn) and Flower + Ray (the
simulation's driver: the ServerApp's rounds and Flower's runtime, with ``per_round`` virtual
nodes as slots; the devices run in Ray's worker processes, not counted). The ratio of the
largest population's peak to the smallest's is the figure (target: at most 1.2).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from mist_fed.fleet.runtime.sim_bench import Measured, Simulate, measure_apart
from mist_fed.fleet.spec import FleetSpec, apply_overrides

log = logging.getLogger(__name__)

TARGET_RATIO = 1.2


@dataclass
class PopulationResult:
    runs: list[Measured]
    per_round: int | None
    rounds: int
    task: str
    cloud: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for engine in dict.fromkeys(m.engine for m in self.runs):
            runs = sorted((m for m in self.runs if m.engine == engine), key=lambda m: m.devices)
            base = runs[0]
            for m in runs:
                out.append({
                    "engine": engine,
                    "population": m.devices,
                    "per round": self.per_round,
                    "device-rounds": m.device_rounds,
                    "driver peak MB": m.peak_rss_mb,
                    "rounds peak MB": m.span_peak_rss_mb,
                    "ratio to smallest": m.peak_rss_mb / base.peak_rss_mb,
                    "rounds s": m.wall_s,
                })  # fmt: skip
        return out

    def ratios(self) -> dict[str, float]:
        """Per engine: the largest population's driver peak over the smallest's."""
        out = {}
        for engine in dict.fromkeys(m.engine for m in self.runs):
            runs = sorted((m for m in self.runs if m.engine == engine), key=lambda m: m.devices)
            out[engine] = runs[-1].peak_rss_mb / runs[0].peak_rss_mb
        return out

    def lines(self) -> list[str]:
        import pandas as pd

        from mist_fed.report.results import format_table

        out = [
            f"population benchmark: {self.task}, {self.per_round} devices a round, "
            f"{self.rounds} rounds",
            "",
            format_table(pd.DataFrame(self.rows())),
            "",
        ]
        for engine, r in self.ratios().items():
            verdict = "within" if r <= TARGET_RATIO else "OVER"
            out.append(
                f"* {engine}: driver peak RSS ratio {r:.3f} ({verdict} the {TARGET_RATIO} target)"
            )
        for m in self.runs:
            reasons = f" {m.reasons}" if m.reasons else ""
            out.append(f"* {m.engine} x {m.devices:,}: device-rounds {m.statuses}{reasons}")
        return out


def bench_population(
    spec: FleetSpec,
    populations: list[int],
    simulate: Simulate,
    engines: tuple[str, ...] = ("plain", "flower"),
    cloud: str | None = None,
    ray_cpus: int | None = None,
    verbose: int = 0,
) -> PopulationResult:
    """``spec`` at each population of ``populations``, on ``engines``, against one cloud."""
    from mist_fed.fleet.runtime.provision import cloud_service

    specs = [apply_overrides(spec, devices=n) for n in sorted(populations)]
    runs: list[Measured] = []
    with cloud_service(spec, cloud) as (location, stats):
        for engine in engines:
            for s in specs:
                log.info("%s: population %d, %s a round", engine, s.num_devices, s.per_round)
                m = measure_apart(engine, s, location, simulate, None, ray_cpus, verbose)
                log.info("%s: %s", engine, dataclasses.asdict(m))
                runs.append(m)
        cloud_stats = stats()
    task = spec.data_task(spec.fleets[0].task)
    return PopulationResult(runs, spec.per_round, spec.rounds, task, cloud_stats)
