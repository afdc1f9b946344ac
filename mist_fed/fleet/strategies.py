"""Per-fleet aggregation by name: one of Flower's own strategies, or ``local`` (no federation).

A fleet names its strategy as Flower spells it (``aggregation = "FedAdam"``, any case) with the
strategy's keyword arguments (``aggregation_args = { eta = 0.01 }``); :func:`canonical` and
:func:`check_args` validate both when the spec is loaded, so a typo is one line listing what
exists, before anything starts. :func:`build` makes the strategy object. Flower's strategy does
the sampling (``configure_train`` over a :class:`FleetView` of the Grid: the fleet's own nodes,
where fleets share one Grid) and the arithmetic on the replies (``aggregate_train``); the fleet
runner only moves jobs, weights and results.

Left out, and why: ``QFedAvg`` needs each device's loss on the global model before training
(an extra evaluation pass per device-round the fleet does not run); the differential-privacy
wrappers (``DifferentialPrivacy*``) wrap another strategy and need a clipping norm and noise
calibrated per task (a wrapper config the fleet spec does not have yet); the ``FedXgb*``
strategies aggregate XGBoost trees, not edge-net weights.

The fleet sets what the strategy's messages look like (the record keys, the weight key) and
evaluates the global model on the server (``fraction_evaluate = 0``), so those arguments are
not the user's. Node counts default to 1, not Flower's 2, so a one-device fleet runs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flwr.serverapp import strategy as fs

from mist_fed.errors import ConfigError

LOCAL = "local"
WEIGHT_KEY = "num-examples"  # the MetricRecord key Flower's strategies weight replies by

# Every Flower strategy the fleet supports, by its Flower name.
STRATEGIES: dict[str, type[fs.Strategy]] = {
    cls.__name__: cls
    for cls in (
        fs.FedAvg,
        fs.FedAvgM,
        fs.FedAdam,
        fs.FedYogi,
        fs.FedAdagrad,
        fs.FedProx,
        fs.FedMedian,
        fs.FedTrimmedAvg,
        fs.Krum,
        fs.MultiKrum,
        fs.Bulyan,
    )
}
NAMES = (*STRATEGIES, LOCAL)

# Arguments the fleet owns: message layout, weighting, evaluation (done on the server).
OWNED = (
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "fraction_evaluate",
    "min_evaluate_nodes",
    "selection_rule",
)
# The fleet's defaults where Flower's would stall a small fleet or evaluate on devices.
DEFAULTS: dict[str, Any] = {
    "min_train_nodes": 1,
    "min_available_nodes": 1,
    "fraction_evaluate": 0.0,
    "min_evaluate_nodes": 0,
}


def canonical(name: str) -> str:
    """Flower's spelling of a strategy name given in any case, or ``local``."""
    by_lower = {n.lower(): n for n in NAMES}
    found = by_lower.get(str(name).strip().lower())
    if found is None:
        raise ConfigError(f"unknown aggregation {name!r}; choose one of {', '.join(NAMES)}")
    return found


def allowed_args(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a user may give strategy ``name`` (none for ``local``)."""
    name = canonical(name)
    if name == LOCAL:
        return {}
    params = inspect.signature(STRATEGIES[name].__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and k not in OWNED}


def check_args(name: str, args: Mapping[str, Any]) -> None:
    """Refuse arguments strategy ``name`` does not take, or of the wrong kind, in one line."""
    allowed = allowed_args(name)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no arguments"
        raise ConfigError(
            f"aggregation {canonical(name)} has no argument(s) {', '.join(unknown)}; "
            f"it takes {takes}"
        )
    for key, value in args.items():
        default = allowed[key].default
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"aggregation {canonical(name)}: {key} must be a number, got {value!r}"
            )
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(
                f"aggregation {canonical(name)}: {key} must be an integer, got {value!r}"
            )


def build(name: str, args: Mapping[str, Any], devices: int) -> fs.Strategy | None:
    """Strategy ``name`` for a fleet of ``devices`` (``None`` for ``local``)."""
    name = canonical(name)
    check_args(name, args)
    if name == LOCAL:
        return None
    kw = {**DEFAULTS, **args}
    for key in ("min_available_nodes", "min_train_nodes"):
        if int(kw.get(key, 0)) > devices:
            raise ConfigError(
                f"aggregation {name}: {key} = {kw[key]} but the fleet has {devices} device(s)"
            )
    params = inspect.signature(STRATEGIES[name].__init__).parameters
    kw = {k: v for k, v in kw.items() if k in params}
    try:
        with quiet():
            return STRATEGIES[name](**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"aggregation {name}: {e}") from e


class FleetView:
    """The part of a shared Grid a strategy sees: the fleet's own nodes.

    Flower's strategies sample with ``grid.get_node_ids()`` in ``configure_train``; through
    this view they sample only their fleet's devices.
    """

    def __init__(self, node_ids: Sequence[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Flower's per-call INFO lines and its warning that evaluation is skipped (the fleet
    scores on the server) off; the fleet's own rows say what each round sampled."""
    flwr = logging.getLogger("flwr")
    level = flwr.level
    flwr.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flwr.setLevel(level)


@contextlib.contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Make a strategy's node sampling (Python's ``random``) repeatable, then restore it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
