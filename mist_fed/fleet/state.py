"""A run's state as plain data: what a checkpoint holds, and how a round engine lists it.

A checkpoint (:mod:`mist_fed.fleet.runtime.resume`) is a :func:`snapshot` after a round:
the engine's :class:`~mist_fed.fleet.rounds.RoundState` (global and device models, clocks, the
central reference, the results rows so far) and, by name, the state of each
:class:`StateProvider` the engine lists (``SyncRounds.providers``: each federated fleet's
aggregator, whose Flower strategy keeps momentum or adaptive moments, and the driver's global
random generators). :func:`restore` gives the state back and loads every provider.

Everything is turned into plain data by :func:`to_plain` (numbers, strings, lists, tuples,
dicts, tensors; numpy arrays as bytes; numpy generators as their state; dataclasses registered with
:func:`register_state_class`), so a checkpoint loads through torch's weights-only unpickler and
no code in a checkpoint file ever runs.

How to add state (one line each):

* a new field of ``RoundState`` is saved and restored with it, as long as its value is plain
  data or a dataclass registered with :func:`register_state_class`;
* an object outside ``RoundState`` that changes as rounds run (an availability model, an
  asynchronous engine's buffer and event queue) gets ``state_dict()`` and
  ``load_state_dict(state)`` methods and one line in its engine:
  ``self.providers["availability"] = model``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from mist_fed.errors import ConfigError

T = TypeVar("T")


@runtime_checkable
class StateProvider(Protocol):
    """Anything whose state a checkpoint saves and a resumed run loads back."""

    def state_dict(self) -> Any:
        """Its state now, as plain data (see the module docstring)."""
        ...

    def load_state_dict(self, state: Any) -> None:
        """Take back a state that :meth:`state_dict` gave."""
        ...


_CLASSES: dict[str, type] = {}
_DATACLASS, _NDARRAY, _RNG = "__dataclass__", "__ndarray__", "__generator__"


def register_state_class(cls: type[T]) -> type[T]:
    """Let dataclass ``cls`` be part of a checkpoint (a decorator)."""
    _CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _class_name(cls: type) -> str:
    name = f"{cls.__module__}.{cls.__qualname__}"
    if _CLASSES.get(name) is not cls:
        raise ConfigError(
            f"cannot checkpoint a {cls.__qualname__}: register it with register_state_class"
        )
    return name


def to_plain(x: Any) -> Any:
    """``x`` as plain data that :func:`from_plain` turns back into ``x``."""
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject:
            raise ConfigError("cannot checkpoint a numpy array of Python objects")
        raw = bytearray(np.ascontiguousarray(x).tobytes())
        data = (
            torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        return {_NDARRAY: [x.dtype.str, list(x.shape), data]}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.random.Generator):  # its bit generator's state: names and integers
        return {_RNG: to_plain(x.bit_generator.state)}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        return {_DATACLASS: _class_name(type(x)), **fields}
    if isinstance(x, Mapping):
        return {to_plain(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(to_plain(v) for v in x)
    if isinstance(x, list):
        return [to_plain(v) for v in x]
    raise ConfigError(f"cannot checkpoint a {type(x).__qualname__}: it is not plain data")


def from_plain(x: Any) -> Any:
    """The inverse of :func:`to_plain`."""
    if isinstance(x, dict):
        if _NDARRAY in x:
            dtype, shape, data = x[_NDARRAY]
            raw = bytearray(data.numpy().tobytes())  # writable, as the array was
            return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
        if _RNG in x:
            state = from_plain(x[_RNG])
            bits = getattr(np.random, state["bit_generator"], None)
            if bits is None:
                raise ConfigError(
                    f"the checkpoint holds an unknown generator {state['bit_generator']}"
                )
            gen = np.random.Generator(bits())
            gen.bit_generator.state = state
            return gen
        if _DATACLASS in x:
            cls = _CLASSES.get(x[_DATACLASS])
            if cls is None:
                raise ConfigError(f"the checkpoint holds an unknown kind of state {x[_DATACLASS]}")
            fields = {k: from_plain(v) for k, v in x.items() if k != _DATACLASS}
            try:
                return cls(**fields)
            except TypeError as e:  # a field added or removed since the checkpoint was written
                raise ConfigError(
                    f"the checkpoint's {cls.__qualname__} does not fit this version's ({e}); "
                    "resume it with the version that wrote it"
                ) from None
        return {k: from_plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(from_plain(v) for v in x)
    if isinstance(x, list):
        return [from_plain(v) for v in x]
    return x


class DriverRandom:
    """The driver's global generators (Python's ``random``, numpy's, torch's) as a provider.

    The rounds derive every seed they use from the spec's seed, the round and the device
    (sampling, dropout, training order), so nothing depends on these; saving them keeps a
    resumed driver where an uninterrupted one would be, should any code draw from them.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=False),
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


def snapshot(state: Any, providers: Mapping[str, StateProvider]) -> dict[str, Any]:
    """``state`` (a round engine's) and each provider's state, as plain data."""
    return {
        "state": to_plain(state),
        "providers": {name: to_plain(p.state_dict()) for name, p in providers.items()},
    }


def restore(saved: Mapping[str, Any], providers: Mapping[str, StateProvider]) -> Any:
    """Load each provider's saved state into ``providers`` and return the engine's state.
    The saved providers must be these, by name: another set means another run."""
    names = dict(saved["providers"])
    if set(names) != set(providers):
        raise ConfigError(
            f"the checkpoint holds state of {', '.join(sorted(names)) or 'nothing'} but this "
            f"run has {', '.join(sorted(providers)) or 'nothing'}; it is another run's"
        )
    for name, p in providers.items():
        p.load_state_dict(from_plain(names[name]))
    return from_plain(saved["state"])
