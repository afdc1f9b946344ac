"""Each device's share of a task's training images: the fleet's pool and its partitioning.

:func:`pool_indices` orders the task split's rows (seeded) into the fleet's pool: all of them,
or the first ``devices x train_per_device``; with ``share_images`` (an explicit choice,
recorded in the run's ``config.toml``) a pool larger than the split repeats it in further
seeded orders, so devices share images.

Which pool rows each device gets is a partitioner's work, named by the spec
(``partitioner = "Dirichlet"``, ``partitioner_args = {...}``). The partitioning registers itself
(:func:`register_partitioning`); :data:`PROVIDERS` are loaded by name on first use (as
:mod:`mist_fed.fleet.aggregation` loads its aggregators), so the domain depends on no Flower
package: Flower Datasets' partitioners are :mod:`mist_fed.fleet.flower.partitioners`.
:func:`check` validates a spec's partitioner when it is loaded; :func:`shares` builds a fleet's
:class:`Shares` once per run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mist_fed.errors import ConfigError

# The module that registers the partitioning when imported (loaded once, on first use).
PROVIDERS = ("mist_fed.fleet.flower.partitioners",)


class Shares(Protocol):
    """One fleet's partitioned pool: each device's rows of the split, resolved when asked."""

    name: str  # the partitioner's registered name
    devices: int
    pool: np.ndarray  # the pool's rows of the split, in order

    def indices(self, device: int) -> list[int]:
        """The split rows of device ``device`` (0-based in its fleet), each once."""
        ...

    @property
    def distinct(self) -> int:
        """How many distinct rows of the split the pool holds."""
        ...

    def plot(self, out: Path, title: str = "") -> list[Path]:
        """The shares' plots written under ``out``; the files written."""
        ...


@dataclass(frozen=True)
class Partitioning:
    """How a spec's partitioner is checked (``(name, args, devices) -> canonical name``, a
    :class:`ConfigError` in one line otherwise) and applied to a pool
    (``(labels, pool, name, args, devices, seed) -> Shares``)."""

    check: Callable[[str, Mapping[str, Any], int], str]
    shares: Callable[[Sequence[int], np.ndarray, str, Mapping[str, Any], int, int], Shares]


_registered: list[Partitioning] = []


def register_partitioning(p: Partitioning) -> None:
    _registered[:] = [p]


def _partitioning() -> Partitioning:
    if not _registered:
        for module in PROVIDERS:
            importlib.import_module(module)
    if not _registered:
        raise ConfigError(f"no partitioning registered (modules {', '.join(PROVIDERS)})")
    return _registered[0]


def check(name: str, args: Mapping[str, Any], devices: int) -> str:
    """Refuse an unknown partitioner, argument or value in one line; the canonical name."""
    return _partitioning().check(name, args, devices)


def shares(
    labels: Sequence[int],
    pool: np.ndarray,
    name: str,
    args: Mapping[str, Any],
    devices: int,
    seed: int,
) -> Shares:
    """The fleet's pool (rows of a split whose labels are ``labels``) partitioned over its
    ``devices`` by partitioner ``name``."""
    return _partitioning().shares(labels, pool, name, args, devices, seed)


def pool_indices(
    n_total: int, wanted: int | None, seed: int, share_images: bool = False
) -> np.ndarray:
    """The fleet's pool: rows of a split of ``n_total`` in a seeded order (as Flower Datasets'
    ``FederatedDataset`` shuffles a split before partitioning it: its ``IidPartitioner`` cuts
    contiguous shards). ``wanted`` None: every row; else the first ``wanted``, continued (only
    with ``share_images``) by further seeded orders of the split when it holds fewer."""
    if wanted is None:
        wanted = n_total
    if wanted > n_total and not share_images:
        raise ConfigError(
            f"the fleet needs {wanted:,} training images but the split has {n_total:,}; use "
            "fewer devices or images per device, --protocol full, or share_images = true "
            "(devices then share images, recorded)"
        )
    parts: list[np.ndarray] = []
    stream = 0
    while sum(len(p) for p in parts) < wanted:
        key = [seed, 7919] if stream == 0 else [seed, 7919, stream]
        parts.append(np.random.default_rng(key).permutation(n_total))
        stream += 1
    return np.concatenate(parts)[:wanted]
