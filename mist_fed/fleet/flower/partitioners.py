"""Each device's share of a task's training images, from Flower Datasets' partitioners.

The partitioning behind :mod:`mist_fed.fleet.partition` (which loads this module by name on
first use, so the domain depends on no Flower package). A fleet names its partitioner as Flower
Datasets spells it, with or without the ``Partitioner`` suffix (``partitioner = "Dirichlet"``,
any case) and its keyword arguments (``partitioner_args = { alpha = 0.3, partition_by = "label"
}``). :func:`check` refuses an unknown name or argument, or a value the partitioner itself
rejects, in one line, when the spec is loaded. ``num_partitions`` is the fleet's device count
(not the user's); ``partition_by`` defaults to ``"label"`` and ``seed`` to the run's seed.

:class:`FlowerShares` applies the partitioner to a local ``datasets.Dataset`` of two columns,
``idx`` (a row of the fleet's pool, :func:`mist_fed.fleet.partition.pool_indices`) and ``label``
(no hub is reached: the dataset is built in memory). A device's share is resolved only when
asked (:meth:`FlowerShares.indices`, when the device is first sampled); the partitioner keeps
its own index table (one list per partition, inside Flower Datasets), the plan nothing per
device.

Left out, and why: ``NaturalId``/``GroupedNaturalId`` partition by a natural-id column a task
split does not have; ``Distribution``, ``Continuous``, ``Size`` and ``IdToSizeFnc`` take a
per-partition table or function a TOML key cannot carry; the vertical partitioners split
columns, not rows.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mist_fed.errors import ConfigError, only_known
from mist_fed.fleet import partition

log = logging.getLogger(__name__)

# The partitioners a fleet may name: the short name -> Flower Datasets' class name.
PARTITIONERS = {
    n: f"{n}Partitioner"
    for n in (
        "Iid",
        "Dirichlet",
        "InnerDirichlet",
        "Pathological",
        "Shard",
        "Linear",
        "Square",
        "Exponential",
    )
}
OWNED = ("num_partitions",)  # the fleet's device count
LABEL = "label"
LABEL_PLOT_DEVICES = 40  # devices shown in the label-distribution plot
SIZE_PLOT_DEVICES = 5000  # devices whose share sizes the histogram counts (the first ones)


def _cls(name: str) -> Any:
    import flwr_datasets.partitioner as fp

    return getattr(fp, PARTITIONERS[name])


def canonical(name: str) -> str:
    """The short registered name of a partitioner given in any case, with or without
    ``Partitioner``."""
    key = str(name).strip().lower().removesuffix("partitioner")
    by_lower = {n.lower(): n for n in PARTITIONERS}
    if key not in by_lower:
        raise ConfigError(
            f"unknown partitioner {name!r}; choose one of {', '.join(PARTITIONERS)} "
            "(Flower Datasets' partitioners)"
        )
    return by_lower[key]


def allowed_args(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a fleet may give partitioner ``name``."""
    params = inspect.signature(_cls(canonical(name)).__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and k not in OWNED}


def _kwargs(name: str, args: Mapping[str, Any], devices: int, seed: int, n: int) -> dict[str, Any]:
    """The partitioner's keyword arguments: the fleet's, its device count, and defaults for
    ``partition_by`` (the label), ``seed`` (the run's) and InnerDirichlet's sizes (even)."""
    allowed = allowed_args(name)
    only_known(f"partitioner {name}", args, allowed)
    kw = dict(args)
    if "partition_by" in allowed:
        kw.setdefault("partition_by", LABEL)
    if "seed" in allowed:
        kw.setdefault("seed", seed)
    if name == "InnerDirichlet" and "partition_sizes" not in kw:
        kw["partition_sizes"] = [len(a) for a in np.array_split(np.arange(n), devices)]
    if "num_partitions" in inspect.signature(_cls(name).__init__).parameters:
        kw["num_partitions"] = devices
    missing = [
        k for k, p in allowed.items() if p.default is inspect.Parameter.empty and k not in kw
    ]
    if missing:
        raise ConfigError(f"partitioner {name} needs {', '.join(missing)} in partitioner_args")
    return kw


def build(name: str, args: Mapping[str, Any], devices: int, seed: int = 0, n: int = 0) -> Any:
    """Flower Datasets' partitioner ``name`` for ``devices`` (no dataset yet); its own
    checks' refusals become one :class:`~mist_fed.errors.ConfigError` line."""
    name = canonical(name)
    kw = _kwargs(name, args, devices, seed, max(n, devices))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _cls(name)(**kw)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"partitioner {name}: {e}".splitlines()[0]) from e


def check(name: str, args: Mapping[str, Any], devices: int) -> str:
    """Refuse an unknown partitioner, argument or value in one line; the canonical name."""
    name = canonical(name)
    build(name, args, devices)
    return name


class FlowerShares:
    """One fleet's pool of a split and its partitioner, applied to a local dataset."""

    def __init__(
        self,
        labels: Sequence[int],
        pool: np.ndarray,
        name: str,
        args: Mapping[str, Any],
        devices: int,
        seed: int,
    ) -> None:
        from datasets import Dataset

        self.pool = pool
        self.devices = devices
        self.name = canonical(name)
        y = np.asarray(labels, dtype=np.int64)[pool]
        self.partitioner = build(self.name, args, devices, seed, len(pool))
        self.partitioner.dataset = Dataset.from_dict({"idx": np.arange(len(pool)), LABEL: y})

    def indices(self, device: int) -> list[int]:
        """The split rows of device ``device`` (0-based in its fleet), each once."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = self.partitioner.load_partition(device)["idx"]
        except (ValueError, KeyError, IndexError) as e:
            raise ConfigError(f"partitioner {self.name}: {e}".splitlines()[0]) from e
        return list(dict.fromkeys(int(i) for i in self.pool[np.asarray(rows, dtype=np.int64)]))

    @property
    def distinct(self) -> int:
        return len(np.unique(self.pool))

    def plot(self, out: Path, title: str = "") -> list[Path]:
        """The per-device label distribution (Flower Datasets' own plot, the first
        :data:`LABEL_PLOT_DEVICES` devices) and a histogram of share sizes (the first
        :data:`SIZE_PLOT_DEVICES`); the files written."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from flwr_datasets.visualization import plot_label_distributions

        out.mkdir(parents=True, exist_ok=True)
        shown = min(self.devices, LABEL_PLOT_DEVICES)
        fig, _, _ = plot_label_distributions(
            self.partitioner,
            LABEL,
            plot_type="bar",
            size_unit="absolute",
            max_num_partitions=shown,
            legend=True,
            verbose_labels=False,
            title=f"{title} label distribution ({self.name}; devices 0-{shown - 1})",
        )
        labels_png = out / "label_distribution.png"
        fig.savefig(labels_png, dpi=110, bbox_inches="tight")
        plt.close(fig)
        counted = min(self.devices, SIZE_PLOT_DEVICES)
        sizes = [len(self.partitioner.load_partition(d)) for d in range(counted)]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(sizes, bins=min(50, max(5, len(set(sizes)))))
        ax.set_xlabel("training images per device")
        ax.set_ylabel("devices")
        ax.set_title(f"{title} share sizes ({self.name}; {counted:,} devices)")
        sizes_png = out / "share_sizes.png"
        fig.savefig(sizes_png, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return [labels_png, sizes_png]


partition.register_partitioning(partition.Partitioning(check=check, shares=FlowerShares))
