"""Flower's own strategies behind the fleet's :class:`~mist_fed.fleet.aggregation.Aggregator`.

A fleet names its strategy as Flower spells it (``aggregation = "FedAdam"``, any case) with the
strategy's keyword arguments (``aggregation_args = { eta = 0.01 }``); importing this module
registers every strategy below with :mod:`mist_fed.fleet.aggregation`, whose registry loads it
on first use. :func:`check_args` validates arguments from the strategy's signature without
building it (a typo is one line listing what exists, before anything starts); Flower's own
checks run when :func:`build` makes the strategy, once per run.
:class:`FlowerAggregator` drives it: Flower's strategy does the sampling (``configure_train``
over a :class:`FleetView`: the fleet's available devices, by number) and the arithmetic on the
replies (``aggregate_train``); the round loop only moves jobs, weights and results.

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
from typing import Any, cast

from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from mist_fed.errors import ConfigError, only_known
from mist_fed.fleet.aggregation import AggregatorKind, Update, register_aggregator
from mist_fed.fleet.flower.messages import strategy_reply, to_state
from mist_fed.fleet.flower.workarounds import local_identity
from mist_fed.fleet.job import StateDict

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
# What a strategy changes as rounds run, all public attributes of Flower's strategies:
# FedAvgM's model and momentum; FedAdam's, FedYogi's and FedAdagrad's model and moments
# (FedOpt's). Every other attribute is set once, from its arguments
# (tests/test_resume.py checks that for every strategy above).
RUN_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")
_RECORD = "array_record"
# The fleet's defaults where Flower's would stall a small fleet or evaluate on devices.
DEFAULTS: dict[str, Any] = {
    "min_train_nodes": 1,
    "min_available_nodes": 1,
    "fraction_evaluate": 0.0,
    "min_evaluate_nodes": 0,
}


def allowed_args(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a user may give strategy ``name``."""
    params = inspect.signature(STRATEGIES[name].__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and k not in OWNED}


def check_args(name: str, args: Mapping[str, Any]) -> None:
    """Refuse arguments strategy ``name`` does not take, or of the wrong kind, in one line."""
    allowed = allowed_args(name)
    only_known(f"aggregation {name}", args, allowed)
    for key, value in args.items():
        default = allowed[key].default
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"aggregation {name}: {key} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"aggregation {name}: {key} must be an integer, got {value!r}")


def build(name: str, args: Mapping[str, Any], devices: int) -> fs.Strategy:
    """Flower's strategy ``name`` for a fleet of ``devices``."""
    check_args(name, args)
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


def _like(state: StateDict, template: StateDict) -> StateDict:
    """``state`` with ``template``'s dtypes (Flower's arithmetic runs in numpy)."""
    return {k: state[k].to(template[k].dtype).contiguous() for k in template}


class FlowerAggregator:
    """A Flower strategy as the fleet's aggregator; Flower's nodes are the device numbers."""

    def __init__(self, strategy: fs.Strategy) -> None:
        self.strategy = strategy

    def sample(
        self,
        rnd: int,
        current: StateDict,
        available: Sequence[int],
        seed: int,
        wanted: int | None = None,
    ) -> tuple[list[int], dict[str, Any]]:
        """The strategy's ``configure_train`` over the available devices, its sampling seeded
        (the strategy keeps ``current``: its server-side optimizers step from it).

        Flower's strategies sample ``max(int(nodes x fraction_train), min_train_nodes)`` of
        the Grid's nodes and wait (forever) while fewer than ``min_available_nodes`` are
        connected; for this round only, :func:`sampling` sets those public attributes so the
        strategy samples ``wanted`` (the fleet's ``per_round``) and never waits on devices
        the availability model has offline. No device available: nobody is sampled."""
        if not available:
            return [], {}
        with (
            local_identity(),
            quiet(),
            seeded_sampling(seed),
            sampling(self.strategy, len(available), wanted),
        ):
            msgs = list(
                self.strategy.configure_train(
                    rnd, ArrayRecord(current), ConfigRecord(), cast(Grid, FleetView(available))
                )
            )
        key = getattr(self.strategy, "configrecord_key", "config")
        config = dict(msgs[0].content.config_records.get(key, {})) if msgs else {}
        return [int(m.metadata.dst_node_id) for m in msgs], config

    def aggregate(self, rnd: int, current: StateDict, updates: list[Update]) -> StateDict | None:
        """The strategy's ``aggregate_train`` over the updates as device replies (each update
        is let go once its reply is made, so a round holds one copy of its models, not two)."""
        with local_identity(), quiet():
            replies = []
            updates.reverse()
            while updates:
                u = updates.pop()
                replies.append(strategy_reply(u.state, u.num_examples, u.device))
                del u
            arrays, _ = self.strategy.aggregate_train(rnd, replies)
            del replies
        return None if arrays is None else _like(to_state(arrays), current)

    def sampled(self, devices: int) -> int:
        frac = float(getattr(self.strategy, "fraction_train", 1.0))
        least = int(getattr(self.strategy, "min_train_nodes", 1))
        return min(devices, max(int(devices * frac), least))

    def state_dict(self) -> dict[str, Any]:
        """The strategy's :data:`RUN_STATE` (those it has), for a checkpoint: numpy arrays,
        lists and dicts of them; an ``ArrayRecord`` as its arrays by name."""
        out: dict[str, Any] = {}
        for name in RUN_STATE:
            if hasattr(self.strategy, name):
                value = getattr(self.strategy, name)
                if isinstance(value, ArrayRecord):
                    value = {_RECORD: {k: a.numpy() for k, a in value.items()}}
                out[name] = value
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set the strategy's :data:`RUN_STATE` back from :meth:`state_dict`."""
        for name, value in state.items():
            if name not in RUN_STATE or not hasattr(self.strategy, name):
                kind = type(self.strategy).__name__
                raise ConfigError(f"the checkpoint holds {name} for {kind}, which has none")
            if isinstance(value, dict) and _RECORD in value:
                value = ArrayRecord({k: Array(v) for k, v in value[_RECORD].items()})
            setattr(self.strategy, name, value)


def _kind(name: str) -> AggregatorKind:
    def check(args: Mapping[str, Any]) -> None:
        check_args(name, args)

    def make(args: Mapping[str, Any], devices: int) -> FlowerAggregator:
        return FlowerAggregator(build(name, args, devices))

    return AggregatorKind(name, check, make)


for _name in STRATEGIES:
    register_aggregator(_kind(_name))


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
def sampling(strategy: fs.Strategy, available: int, wanted: int | None) -> Iterator[None]:
    """For one ``configure_train``: at most ``available`` nodes asked for and waited on, and
    exactly ``wanted`` (capped by ``available``) when given; the strategy's own values after."""
    keys = ("fraction_train", "min_train_nodes", "min_available_nodes")
    saved = {k: getattr(strategy, k) for k in keys if hasattr(strategy, k)}
    try:
        for key in ("min_available_nodes", "min_train_nodes"):
            if key in saved:
                setattr(strategy, key, min(int(saved[key]), available))
        if wanted is not None and "fraction_train" in saved:
            # int(nodes x fraction) is 0 for a fraction this small: min_train_nodes decides
            setattr(strategy, "fraction_train", 1e-12)  # noqa: B010
            setattr(strategy, "min_train_nodes", min(wanted, available))  # noqa: B010
        yield
    finally:
        for k, v in saved.items():
            setattr(strategy, k, v)


@contextlib.contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Make a strategy's node sampling (Python's ``random``) repeatable, then restore it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
