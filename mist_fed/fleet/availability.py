"""When devices can be sampled: a fleet's availability model, on the run's virtual clock.

``availability`` (fleet key; ``--availability``) is one of:

* ``always``: every device, every round.
* ``dropout:P``: every device can be sampled; each sampled device drops out of its round with
  probability ``P`` (seeded per round; recorded as ``dropped``, sent nothing).
* ``diurnal`` or ``diurnal:H``: a device is online ``H`` hours a day (default 8: the night it
  spends charging, as FedScale's traces show), from a start hour of its own (device ``d``
  starts at ``24 * frac(d * 0.618...)``: spread evenly over the day, computed per device, no
  table).
* ``trace:PATH``: a trace file of online intervals in simulated hours (FedScale's kind), one
  row per device: ``device,online`` then e.g. ``17,0-2.5;6-9.25``. A device absent from the
  trace is never online. The trace repeats with a period of its last end, rounded up to whole
  days. :func:`load_trace` refuses overlapping intervals, unknown devices (outside the
  population), repeated rows and malformed lines, each in one line.

The clock is the run's (:attr:`~mist_fed.fleet.rounds.RoundState.sim_s`): each round starts
at the simulated time the previous one ended, so availability and time-to-accuracy read one
clock. A device is sampled only while available (:meth:`Availability.online`).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mist_fed.errors import ConfigError

KINDS = ("always", "dropout:P", "diurnal[:HOURS]", "trace:PATH")
GOLDEN = (math.sqrt(5) - 1) / 2
DIURNAL_HOURS = 8.0


def _bad(text: str) -> ConfigError:
    return ConfigError(
        f"availability {text!r} not understood; write one of {', '.join(KINDS)} "
        "(e.g. dropout:0.1, diurnal:8, trace:simulations/traces/example.csv)"
    )


@dataclass(frozen=True)
class Trace:
    """Online intervals (hours) as three columns: interval ``i`` is device ``owner[i]``'s,
    from ``starts[i]`` to ``ends[i]``."""

    path: str
    owner: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    period_h: float

    def online(self, devices: np.ndarray, hours: float) -> np.ndarray:
        t = hours % self.period_h
        up = np.unique(self.owner[(self.starts <= t) & (t < self.ends)])
        return np.isin(devices, up)


def _interval(text: str, where: str) -> tuple[float, float]:
    a, sep, b = text.strip().partition("-")
    try:
        start, end = float(a), float(b)
    except ValueError:
        raise ConfigError(f"{where}: interval {text!r} is not START-END in hours") from None
    if not sep or not (0 <= start < end) or not math.isfinite(end):
        raise ConfigError(f"{where}: interval {text!r} needs 0 <= start < end (hours)")
    return start, end


def load_trace(path: str | Path, population: int) -> Trace:
    """Read and validate a trace for a population of ``population`` devices (see the module
    docstring for the format)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"availability trace {p} not found; see docs/fleets.md for the format")
    per: dict[int, list[tuple[float, float]]] = {}
    with p.open(newline="") as f:
        rows = csv.reader(line for line in f if line.strip() and not line.startswith("#"))
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != ["device", "online"]:
            raise ConfigError(f"trace {p}: the first row must be the header `device,online`")
        for n, row in enumerate(rows, start=2):
            where = f"trace {p} row {n}"
            if len(row) != 2 or not row[0].strip().isdigit():
                raise ConfigError(f"{where}: expected `DEVICE,START-END;START-END`, got {row}")
            d = int(row[0])
            if d >= population:
                raise ConfigError(
                    f"{where}: device {d} is not in the population of {population:,} devices "
                    f"(0..{population - 1})"
                )
            if d in per:
                raise ConfigError(f"{where}: device {d} has a second row; give one row a device")
            spans = sorted(_interval(s, where) for s in row[1].split(";") if s.strip())
            for (a0, a1), (b0, b1) in itertools.pairwise(spans):
                if b0 < a1:
                    raise ConfigError(
                        f"{where}: device {d} has overlapping intervals {a0:g}-{a1:g} and "
                        f"{b0:g}-{b1:g}"
                    )
            per[d] = spans
    flat = [(d, a, b) for d, spans in per.items() for a, b in spans]
    owner = np.array([d for d, _, _ in flat], dtype=np.int64)
    starts = np.array([a for _, a, _ in flat], dtype=float)
    ends = np.array([b for _, _, b in flat], dtype=float)
    last = float(ends.max()) if len(ends) else 24.0
    return Trace(str(p), owner, starts, ends, 24.0 * max(1, math.ceil(last / 24.0)))


@dataclass(frozen=True)
class Availability:
    """A parsed availability model (:func:`parse`); :meth:`bind` loads a trace."""

    kind: str = "always"
    p: float = 0.0  # dropout
    hours: float = DIURNAL_HOURS  # diurnal
    path: str = ""  # trace
    trace: Trace | None = field(default=None, compare=False)

    def bind(self, population: int) -> Availability:
        """This model ready for a population (a trace read and validated against it)."""
        if self.kind != "trace":
            return self
        return Availability(self.kind, path=self.path, trace=load_trace(self.path, population))

    def online(self, devices: np.ndarray, sim_s: float) -> np.ndarray:
        """Which of ``devices`` (run-wide numbers) can be sampled at simulated second ``sim_s``."""
        hours = sim_s / 3600.0
        if self.kind == "diurnal":
            start = (devices * GOLDEN % 1.0) * 24.0
            return ((hours - start) % 24.0) < self.hours
        if self.kind == "trace":
            assert self.trace is not None, "bind() the trace to the population first"
            return self.trace.online(devices, hours)
        return np.ones(len(devices), dtype=bool)

    def dropped(self, sampled: list[int], rnd: int, seed: int) -> set[int]:
        """The sampled devices that drop out of round ``rnd`` (``dropout:P`` only)."""
        if self.kind != "dropout" or not sampled:
            return set()
        draws = np.random.default_rng([seed, 4241, rnd]).random(len(sampled))
        return {d for d, u in zip(sorted(sampled), draws, strict=True) if u < self.p}

    @property
    def drop_p(self) -> float:
        return self.p if self.kind == "dropout" else 0.0


def parse(text: str) -> Availability:
    """``always`` | ``dropout:P`` | ``diurnal[:HOURS]`` | ``trace:PATH`` -> a model; one
    :class:`~mist_fed.errors.ConfigError` line when it is none of them."""
    kind, sep, arg = str(text).strip().partition(":")
    if kind == "always" and not sep:
        return Availability()
    if kind == "dropout" and arg:
        try:
            p = float(arg)
        except ValueError:
            raise _bad(text) from None
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"availability dropout:P needs P in [0, 1), got {arg}")
        return Availability("dropout", p=p)
    if kind == "diurnal":
        try:
            hours = float(arg) if arg else DIURNAL_HOURS
        except ValueError:
            raise _bad(text) from None
        if not 0.0 < hours <= 24.0:
            raise ConfigError(f"availability diurnal:HOURS needs 0 < HOURS <= 24, got {arg}")
        return Availability("diurnal", hours=hours)
    if kind == "trace" and arg:
        if not Path(arg).is_file():
            raise ConfigError(
                f"availability trace {arg} not found; make one with simulations/make_trace.py "
                "(format: docs/fleets.md)"
            )
        return Availability("trace", path=arg)
    raise _bad(text)


def synthetic_trace(devices: int, days: int = 2, seed: int = 0) -> list[str]:
    """A trace's lines (header first) of ``devices`` phones online while charging: each night
    from about 22:00 (normal, 2 h spread) for 5-9 hours, and on some days a short top-up
    (0.5-2 h) in the afternoon; seeded. What ``simulations/make_trace.py`` writes."""
    rng = np.random.default_rng([seed, 2207])
    lines = ["device,online"]
    for d in range(devices):
        spans: list[tuple[float, float]] = []
        for day in range(days):
            if rng.random() < 0.4:
                start = day * 24 + rng.uniform(12, 17)
                spans.append((start, start + rng.uniform(0.5, 2.0)))
            start = day * 24 + float(np.clip(rng.normal(22, 2), 18, 26))
            spans.append((start, start + rng.uniform(5, 9)))
        merged: list[tuple[float, float]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        lines.append(f"{d}," + ";".join(f"{a:.2f}-{b:.2f}" for a, b in merged))
    return lines
