"""Asynchronous aggregators, registered by name beside Flower's strategies: FedBuff and FedAsync.

Flower has no asynchronous strategy, so these two are ours, pure torch on state dicts (no
Flower, no Ray). The event-driven engine (:mod:`mist_fed.fleet.async_rounds`) buffers the
updates and calls :meth:`step` once a server step's ``buffer_size`` updates are in.

* **FedBuff** (Nguyen et al., AISTATS 2022): a buffer of ``buffer_size`` updates, then one
  server step ``w <- w + server_lr * sum_i n_i s(tau_i) (w_i - base_i) / sum_i n_i``: each
  device's delta against the model it trained from, weighted by its examples ``n_i`` and its
  staleness weight ``s(tau)``. With ``server_lr = 1``, constant weights, staleness 0 and the
  whole fleet in the buffer this is FedAvg.
* **FedAsync** (Xie et al., 2019): every update is a server step
  ``w <- (1 - a) w + a w_i`` with ``a = alpha * s(tau_i)``.

Staleness ``tau``: server steps since the model the device trained from. Weights:
``staleness = "polynomial"`` gives ``s(tau) = (1 + tau) ** -staleness_exponent`` (the default
exponent 0.5 is FedBuff's and FedScale's ``1 / sqrt(1 + tau)``), ``"constant"`` gives 1.
``max_staleness``: updates older than this many server steps are dropped, never buffered.
``max_concurrency``: devices training at once in simulated time (default: every device of
the fleet). Arguments are checked by name and kind when the spec loads (one line each).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mist_fed.errors import ConfigError
from mist_fed.fleet.aggregation import AggregatorKind, Update, register_aggregator
from mist_fed.fleet.job import StateDict

STALENESS = ("polynomial", "constant")


@dataclass(frozen=True)
class _Arg:
    default: Any
    check: Callable[[Any], bool]
    kind: str  # what the one-line refusal says the value must be


def _int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(lo: float, hi: float = float("inf"), open_lo: bool = True) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        return (v > lo if open_lo else v >= lo) and v <= hi

    return ok


_COMMON: dict[str, _Arg] = {
    "max_concurrency": _Arg(None, _int(1), "an integer >= 1"),
    "max_staleness": _Arg(None, _int(0), "an integer >= 0"),
    "staleness": _Arg("polynomial", lambda v: v in STALENESS, f"one of {', '.join(STALENESS)}"),
    "staleness_exponent": _Arg(0.5, _num(0.0, open_lo=False), "a number >= 0"),
}
FEDBUFF_ARGS: dict[str, _Arg] = {
    "buffer_size": _Arg(10, _int(1), "an integer >= 1"),
    "server_lr": _Arg(1.0, _num(0.0), "a number > 0"),
    **_COMMON,
}
FEDASYNC_ARGS: dict[str, _Arg] = {"alpha": _Arg(0.5, _num(0.0, 1.0), "in (0, 1]"), **_COMMON}


def _checker(name: str, table: Mapping[str, _Arg]) -> Callable[[Mapping[str, Any]], None]:
    def check(args: Mapping[str, Any]) -> None:
        unknown = sorted(set(args) - set(table))
        if unknown:
            raise ConfigError(
                f"aggregation {name} takes no argument(s) {', '.join(unknown)}; "
                f"it takes {', '.join(table)}"
            )
        for key, value in args.items():
            if value is not None and not table[key].check(value):
                raise ConfigError(
                    f"aggregation {name}: {key} must be {table[key].kind}, got {value!r}"
                )

    return check


def _resolved(table: Mapping[str, _Arg], args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (args[k] if args.get(k) is not None else a.default) for k, a in table.items()}


def staleness_weight(kind: str, exponent: float, staleness: int) -> float:
    """``(1 + staleness) ** -exponent`` (``polynomial``) or 1 (``constant``)."""
    if staleness < 0:
        raise ValueError(f"staleness is a count of server steps, got {staleness}")
    return 1.0 if kind == "constant" else float((1.0 + staleness) ** -exponent)


class _Staleness:
    """What both aggregators share: concurrency, the staleness cap and weight."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.max_concurrency: int | None = args["max_concurrency"]
        self.max_staleness: int | None = args["max_staleness"]
        self.staleness: str = args["staleness"]
        self.exponent = float(args["staleness_exponent"])

    def weight(self, staleness: int) -> float:
        return staleness_weight(self.staleness, self.exponent, staleness)


def _floats(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


class FedBuff(_Staleness):
    """Buffered asynchronous aggregation (see the module docstring)."""

    def __init__(self, args: Mapping[str, Any], devices: int) -> None:
        args = _resolved(FEDBUFF_ARGS, args)
        super().__init__(args)
        self.buffer_size = int(args["buffer_size"])
        self.server_lr = float(args["server_lr"])

    def sampled(self, devices: int) -> int:
        return min(self.buffer_size, devices)

    def step(self, current: StateDict, updates: list[Update]) -> StateDict:
        total = sum(u.num_examples for u in updates)
        if not updates or total <= 0:
            return current
        new = dict(current)
        for k in _floats(current):
            delta = torch.zeros_like(current[k], dtype=torch.float64)
            for u in updates:
                if u.base is None:
                    raise ValueError(f"FedBuff needs each update's base model (device {u.device})")
                w = u.num_examples * self.weight(u.staleness) / total
                delta += w * (u.state[k].double() - u.base[k].double())
            new[k] = (current[k].double() + self.server_lr * delta).to(current[k].dtype)
        return new


class FedAsync(_Staleness):
    """Asynchronous mixing of every update into the global model (see the module docstring)."""

    buffer_size = 1

    def __init__(self, args: Mapping[str, Any], devices: int) -> None:
        args = _resolved(FEDASYNC_ARGS, args)
        super().__init__(args)
        self.alpha = float(args["alpha"])

    def sampled(self, devices: int) -> int:
        return 1

    def step(self, current: StateDict, updates: list[Update]) -> StateDict:
        new = dict(current)
        for u in updates:
            a = self.alpha * self.weight(u.staleness)
            for k in _floats(current):
                mixed = (1.0 - a) * new[k].double() + a * u.state[k].double()
                new[k] = mixed.to(current[k].dtype)
        return new


register_aggregator(
    AggregatorKind("FedBuff", _checker("FedBuff", FEDBUFF_ARGS), FedBuff, asynchronous=True)
)
register_aggregator(
    AggregatorKind("FedAsync", _checker("FedAsync", FEDASYNC_ARGS), FedAsync, asynchronous=True)
)
