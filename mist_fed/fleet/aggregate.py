"""FedAvg within a task fleet: the example-weighted mean of the devices' edge-net weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mist_fed.errors import ConfigError

StateDict = dict[str, torch.Tensor]


def fedavg(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """Weighted mean of state dicts with the same keys and shapes.

    Floating tensors are averaged in float64 and cast back; integer buffers (counters) take the
    first device's value. Raises :class:`ConfigError` when nothing is given or shapes differ.
    """
    if not states or len(states) != len(weights):
        raise ConfigError("fedavg needs one weight per state dict and at least one state dict")
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError("fedavg weights (example counts) must sum to > 0")
    keys = list(states[0])
    out: StateDict = {}
    for k in keys:
        first = states[0][k]
        for s in states[1:]:
            if k not in s or s[k].shape != first.shape:
                raise ConfigError(f"fedavg: devices disagree on parameter {k!r}")
        if not first.is_floating_point():
            out[k] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[k].to(torch.float64) * (float(w) / total)
        out[k] = acc.to(first.dtype)
    return out


def aggregate_fleet(
    aggregation: str, results: Sequence[tuple[int, StateDict, float]]
) -> dict[int, StateDict] | StateDict:
    """``fedavg``: one shared state for the fleet; ``local``: each device keeps its own.

    ``results`` holds ``(device, state, num_examples)`` of the devices that finished the round.
    """
    if aggregation == "fedavg":
        return fedavg([s for _, s, _ in results], [n for _, _, n in results])
    if aggregation == "local":
        return {d: s for d, s, _ in results}
    raise ConfigError(f"unknown aggregation {aggregation!r}; use fedavg or local")
