"""How a fleet samples its devices and merges their models: the :class:`Aggregator` protocol
and the registry of aggregators by name.

A fleet names its aggregation (``aggregation = "FedAdam"``, any case) with keyword arguments
(``aggregation_args = { eta = 0.01 }``). :func:`canonical` and :func:`check_args` validate both
when the spec is loaded (one line listing what exists), without building anything;
:func:`build` makes the aggregator once per run. ``local`` is no aggregation: every device goes
on from its own model.

Aggregators register themselves by kind (:func:`register_aggregator`). The registry loads the
modules of :data:`PROVIDERS` on first use, by name (as Python's entry points would), so the
domain depends on none of them: Flower's strategies (:mod:`mist_fed.fleet.flower.strategies`),
synchronous, and the asynchronous FedBuff and FedAsync (:mod:`mist_fed.fleet.async_aggregation`,
an :class:`AsyncAggregator` each, which the event-driven engine of
:mod:`mist_fed.fleet.async_rounds` drives). An aggregator sees device numbers and state dicts
only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mist_fed.errors import ConfigError
from mist_fed.fleet.job import StateDict
from mist_fed.fleet.state import register_state_class

LOCAL = "local"
# Modules that register aggregators when imported (loaded once, on the registry's first use).
PROVIDERS = ("mist_fed.fleet.flower.strategies", "mist_fed.fleet.async_aggregation")


@register_state_class
@dataclass(frozen=True)
class Update:
    """One device's trained model as an aggregator takes it."""

    device: int
    state: StateDict
    num_examples: int
    staleness: int = 0  # server steps since the model it trained from (0 in synchronous rounds)
    base: StateDict | None = None  # the model it trained from (asynchronous aggregators' deltas)


class Aggregator(Protocol):
    """One fleet's sampling and aggregation, over device numbers."""

    def sample(
        self,
        rnd: int,
        current: StateDict,
        available: Sequence[int],
        seed: int,
        wanted: int | None = None,
    ) -> tuple[list[int], dict[str, Any]]:
        """The devices among ``available`` that train in round ``rnd`` from ``current`` (the
        global model), repeatable for ``seed``: ``wanted`` of them (the fleet's ``per_round``;
        at most all available), else as many as the aggregator's own arguments say; and the
        config the aggregator sends them (e.g. ``proximal-mu``)."""
        ...

    def aggregate(self, rnd: int, current: StateDict, updates: list[Update]) -> StateDict | None:
        """The new global model from ``updates`` (consumed: each may be let go once read), in
        ``current``'s dtypes; ``None`` when the aggregator makes none this round."""
        ...

    def sampled(self, devices: int) -> int:
        """How many of ``devices`` available devices a round samples."""
        ...


class AsyncAggregator(Protocol):
    """One asynchronous fleet's server step over buffered updates (FedBuff, FedAsync): the
    event-driven engine (:mod:`mist_fed.fleet.async_rounds`) keeps the buffer and the clock."""

    buffer_size: int  # updates a server step takes
    max_concurrency: int | None  # devices training at once in simulated time (None: all)
    max_staleness: int | None  # updates staler than this are dropped (None: none)

    def weight(self, staleness: int) -> float:
        """The staleness weight of an update ``staleness`` server steps old."""
        ...

    def step(self, current: StateDict, updates: list[Update]) -> StateDict:
        """The new global model from ``current`` and ``buffer_size`` updates (each with its
        ``base`` and ``staleness``), in ``current``'s dtypes."""
        ...

    def sampled(self, devices: int) -> int:
        """Updates a server step takes from a fleet of ``devices`` (the central reference's
        share per step)."""
        ...


@dataclass(frozen=True)
class AggregatorKind:
    """A registered aggregation: how to check its arguments and how to build it."""

    name: str
    check: Callable[[Mapping[str, Any]], None]  # raises ConfigError, one line
    # (args, devices of the fleet) -> the aggregator
    build: Callable[[Mapping[str, Any], int], Aggregator | AsyncAggregator]
    asynchronous: bool = False  # driven by the event-driven engine, not by rounds


_KINDS: dict[str, AggregatorKind] = {}
_loaded = False


def register_aggregator(kind: AggregatorKind) -> None:
    _KINDS[kind.name] = kind


def kinds() -> dict[str, AggregatorKind]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PROVIDERS:
            importlib.import_module(module)
    return _KINDS


def names() -> tuple[str, ...]:
    """Every aggregation a fleet may name: synchronous ones first, then asynchronous ones (each
    in its module's order, whatever was imported first), ``local`` last."""
    every = kinds()
    return (*sorted(every, key=lambda n: every[n].asynchronous), LOCAL)  # a stable sort


def canonical(name: str) -> str:
    """The registered spelling of an aggregation given in any case, or ``local``."""
    by_lower = {n.lower(): n for n in names()}
    found = by_lower.get(str(name).strip().lower())
    if found is None:
        raise ConfigError(f"unknown aggregation {name!r}; choose one of {', '.join(names())}")
    return found


def check_args(name: str, args: Mapping[str, Any]) -> None:
    """Refuse arguments aggregation ``name`` does not take, or of the wrong kind, in one line."""
    name = canonical(name)
    if name == LOCAL:
        if args:
            raise ConfigError(f"aggregation local takes no arguments, got {', '.join(args)}")
        return
    kinds()[name].check(args)


def is_async(name: str) -> bool:
    """Whether aggregation ``name`` (any case) is asynchronous (FedBuff, FedAsync)."""
    name = canonical(name)
    return name != LOCAL and kinds()[name].asynchronous


def build(name: str, args: Mapping[str, Any], devices: int) -> Aggregator | None:
    """Synchronous aggregation ``name`` for a fleet of ``devices`` (``None`` for ``local``)."""
    name = canonical(name)
    check_args(name, args)
    if name == LOCAL:
        return None
    agg = kinds()[name].build(args, devices)
    if kinds()[name].asynchronous:
        raise ConfigError(f"aggregation {name} is asynchronous: the round loop cannot run it")
    return agg  # type: ignore[return-value]


def build_async(name: str, args: Mapping[str, Any], devices: int) -> AsyncAggregator:
    """Asynchronous aggregation ``name`` (FedBuff, FedAsync) for a fleet of ``devices``."""
    name = canonical(name)
    check_args(name, args)
    if not is_async(name):
        raise ConfigError(f"aggregation {name} is not asynchronous")
    return kinds()[name].build(args, devices)  # type: ignore[return-value]
