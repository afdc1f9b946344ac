"""How a fleet samples its devices and merges their models: the :class:`Aggregator` protocol
and the registry of aggregators by name.

A fleet names its aggregation (``aggregation = "FedAdam"``, any case) with keyword arguments
(``aggregation_args = { eta = 0.01 }``). :func:`canonical` and :func:`check_args` validate both
when the spec is loaded (one line listing what exists), without building anything;
:func:`build` makes the aggregator once per run. ``local`` is no aggregation: every device goes
on from its own model.

Aggregators register themselves by kind (:func:`register_aggregator`). The registry loads the
modules of :data:`PROVIDERS` on first use, by name (as Python's entry points would), so the
domain depends on none of them: today Flower's strategies
(:mod:`mist_fed.fleet.flower.strategies`); an asynchronous aggregator (FedBuff) would register
beside them. An aggregator sees device numbers and state dicts only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mist_fed.errors import ConfigError
from mist_fed.fleet.job import StateDict

LOCAL = "local"
# Modules that register aggregators when imported (loaded once, on the registry's first use).
PROVIDERS = ("mist_fed.fleet.flower.strategies",)


@dataclass(frozen=True)
class Update:
    """One device's trained model as an aggregator takes it."""

    device: int
    state: StateDict
    num_examples: int
    staleness: int = 0  # server steps since the model it trained from (0 in synchronous rounds)


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


@dataclass(frozen=True)
class AggregatorKind:
    """A registered aggregation: how to check its arguments and how to build it."""

    name: str
    check: Callable[[Mapping[str, Any]], None]  # raises ConfigError, one line
    build: Callable[[Mapping[str, Any], int], Aggregator]  # (args, devices of the fleet)


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
    """Every aggregation a fleet may name, ``local`` last."""
    return (*kinds(), LOCAL)


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


def build(name: str, args: Mapping[str, Any], devices: int) -> Aggregator | None:
    """Aggregation ``name`` for a fleet of ``devices`` (``None`` for ``local``)."""
    name = canonical(name)
    check_args(name, args)
    return None if name == LOCAL else kinds()[name].build(args, devices)
