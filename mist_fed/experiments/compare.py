"""The paper's Table 1 (and Figures 4 and 5) through our own pipeline: cloud -> wire -> edge.

Every row is a :class:`Variant`: a separated-tuning method, the wire dtype its features are
streamed in, and how its ``k`` is set. For each task the cloud (a real
:func:`~mist_fed.cloud.runner.running_cloud` Flight server) first fills its store from one
backbone pass per image (the service's ``warm`` action); then every row is one
job of an :class:`~mist_fed.device.edge.EdgeDevice` (the same device the standalone client and
the fleet run) under the comparison's profile: it pulls the row's splits over Flight into its
on-device cache once (a rerun or ``--resume`` with the same device directory downloads nothing),
streams them batch by batch into the trainer, evaluates on val and test, and reports its
:class:`~mist_fed.device.metrics.DeviceMetrics`. A row's columns are those metrics (the names
``metrics.json`` and ``devices.parquet`` use) plus:

* ``bytes_per_image``: what the row's feature sets cost over the link per image (the bytes the
  cloud streamed for them divided by their rows; recorded in the cache when first paid, so a
  cached rerun reports the same figure while its ``feature_bytes`` is 0);
* ``cloud_macs``: the backbone's MACs per image for the method's gather
  (:func:`~mist_fed.cloud.macs.cloud_macs`);
* ``accuracy`` (test), ``val_accuracy``, ``k`` and the row's identity.

``peak_mem_mb`` is the job's peak RSS rise while it trains and evaluates, reading its features
from the cache batch by batch (the pull into the cache comes first, on the same device, and
is metered apart: the comparison's cloud serves from this process, and its buffers are not
the edge job's); ``edge_params`` / ``edge_macs`` are those of the net the device trained.

k: MIST trains one LAE per candidate ``k`` (the rows ``mist k=..``, the paper's Figure 5) and
the ``mist`` row is the one best on validation. ``gather_linear`` selects its own ``k``; the
block-function ablations and the compressed wires use MIST's chosen ``k`` for that seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mist_fed.assets.defaults import cache_dir
from mist_fed.cloud.backbone import create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.macs import cloud_macs
from mist_fed.cloud.runner import running_cloud
from mist_fed.core.methods import get_method, method_gather
from mist_fed.core.specs import GatherSpec, candidate_ks
from mist_fed.data import get_task
from mist_fed.data.tasks import Task
from mist_fed.device.cache import CachedSplit
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.memory import tune_allocator
from mist_fed.device.metrics import best_k
from mist_fed.device.profiles import DeviceProfile, load_profile
from mist_fed.device.source import FeatureSource, FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.errors import ConfigError
from mist_fed.experiments.rows import RowResult

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
K_NAMES = ("N/3", "2N/3", "N")  # the candidate depths, in order (the paper's Figure 5)
DEFAULT_PROFILE = "laptop"  # a host-like device: the comparison measures methods, not a phone


@dataclass(frozen=True)
class Variant:
    """One table row kind: ``method`` with features in ``dtype``; ``k`` how depth is set.

    ``k``: ``"select"`` (best of the candidates on val), ``"mist"`` (MIST's choice this seed),
    an integer fraction index ``0/1/2`` into the candidates, or ``None`` (method has no k).
    """

    label: str
    method: str
    dtype: str = "float32"
    k: str | int | None = None
    group: str = "paper"


def default_variants(wire_dtypes: Sequence[str] = ("float16", "int8", "int8ch")) -> list[Variant]:
    out = [
        Variant("linear", "linear"),
        Variant("partial1", "partial1"),
        Variant("side", "side"),
        Variant("mist", "mist", k="select"),
        Variant("gather_linear", "gather_linear", k="select", group="ablation"),
        Variant("lae_zn", "lae_zn", group="ablation"),
        Variant("mist_mlp", "mist_mlp", k="mist", group="ablation"),
        Variant("mist_dwconv", "mist_dwconv", k="mist", group="ablation"),
    ]
    out += [Variant(f"mist k={f}", "mist", k=i, group="k") for i, f in enumerate(K_NAMES)]
    out += [Variant("mist", "mist", dtype=d, k="mist", group="wire") for d in wire_dtypes]
    out += [Variant("mist_pool", "mist_pool", dtype=d, k="mist", group="wire") for d in wire_dtypes]
    return out


@dataclass(frozen=True)
class CompareConfig:
    tasks: tuple[str, ...]
    backbone: str
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False
    seeds: int = 1
    epochs: int = 30
    micro_batch: int = 0
    batch_size: int = 32
    limits: dict[str, int | None] = field(default_factory=dict)  # split -> max images
    variants: tuple[Variant, ...] = ()
    few_shot: tuple[int, ...] = ()  # shots per class; empty = the VTAB-1k protocol
    mist_k: int | None = None  # MIST's k fixed (no selection on val); None = select
    cache_dir: str | None = None  # the cloud's feature store (None: under MIST_FED_CACHE)
    profile: str = DEFAULT_PROFILE  # the edge device every row runs on (name or .toml path)
    device_dir: str | None = None  # the device's storage; None: default_device_dir()
    numerics: str = "auto"  # the cloud backbone's numerics (mist_fed/cloud/numerics.py)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("give at least one task (--tasks)")
        if self.seeds < 1 or self.epochs < 1:
            raise ConfigError(f"seeds and epochs must be >= 1 (got {self.seeds}, {self.epochs})")
        for v in self.variants or default_variants():
            get_method(v.method)
        if self.mist_k is not None and self.mist_k < 1:
            raise ConfigError(f"--mist-k must be >= 1, got {self.mist_k}")

    @property
    def storage(self) -> Path:
        return Path(self.device_dir) if self.device_dir else default_device_dir()


def default_device_dir(run_id: str = "default") -> Path:
    """Where a comparison run's device keeps its features (``$MIST_FED_CACHE/compare/<run>``)."""
    return cache_dir() / "compare" / run_id


def few_shot_ids(ids: Sequence[str], labels: Sequence[int], shots: int, seed: int) -> list[str]:
    """``shots`` ids per class drawn (seeded) from a split: the few-shot train set."""
    order = np.random.default_rng(seed).permutation(len(ids))
    taken: dict[int, int] = {}
    out: list[str] = []
    for i in order:
        c = int(labels[i])
        if taken.get(c, 0) < shots:
            taken[c] = taken.get(c, 0) + 1
            out.append(ids[i])
    return out


def bytes_per_image(splits: Sequence[CachedSplit]) -> float:
    """Link bytes per feature row of ``splits`` (as paid when each was first pulled)."""
    rows = sum(s.rows for s in splits)
    return sum(s.paid_bytes for s in splits) / rows if rows else math.nan


class Comparison:
    """Runs the variants of one task, each row a job of an :class:`EdgeDevice` (module docstring).

    ``source``: where the device's features come from (the comparison's cloud); ``num_blocks``:
    the cloud backbone's depth (the k candidates); ``cloud_macs(method, k)``: the cloud's MACs
    per image. Without ``source`` only the planning methods (:meth:`ks_for`, :meth:`pairs`) work.
    """

    def __init__(
        self,
        cfg: CompareConfig,
        task: Task,
        task_spec: str,
        num_blocks: int,
        source: FeatureSource | None = None,
        profile: DeviceProfile | None = None,
        cloud_macs: Callable[[str, int | None], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.task_spec = task_spec
        self.num_blocks = num_blocks
        self.source = source
        self.profile = profile
        self._cloud_macs = cloud_macs
        self._macs: dict[tuple[str, int | None], int] = {}
        self.ks = candidate_ks(num_blocks)
        if cfg.mist_k is not None and cfg.mist_k > num_blocks:
            raise ConfigError(
                f"--mist-k {cfg.mist_k} is deeper than the backbone's {num_blocks} blocks"
            )
        self.ids: dict[str, list[str] | None] = {}
        for s in SPLITS:  # None: the whole split, by reference
            limit = cfg.limits.get(s)
            ids = task.split(s).ids
            self.ids[s] = None if limit is None or limit >= len(ids) else list(ids[:limit])

    # -- planning --------------------------------------------------------------------------
    def spec(self, method: str, k: int | None) -> GatherSpec:
        return method_gather(method, self.num_blocks, k)

    def ks_for(self, v: Variant) -> list[int | None]:
        """The k values variant ``v`` may train at (selected among, or fixed by ``--mist-k``)."""
        if not get_method(v.method).tunes_k:
            return [None]
        if isinstance(v.k, int):
            return [self.ks[v.k]]
        if self.cfg.mist_k is not None and (v.method == "mist" or v.k == "mist"):
            return [self.cfg.mist_k]
        return list(self.ks)

    def pairs(self, variants: Sequence[Variant]) -> list[tuple[GatherSpec, str]]:
        """Every (gather spec, dtype) the variants can ask the cloud for."""
        out: set[tuple[GatherSpec, str]] = set()
        for v in variants:
            for k in self.ks_for(v):
                out.add((self.spec(v.method, k), v.dtype))
        return sorted(out, key=lambda p: (p[0].label(), p[1]))

    def cloud_macs(self, method: str, k: int | None) -> int:
        if self._cloud_macs is None:
            return 0
        if (method, k) not in self._macs:
            self._macs[(method, k)] = self._cloud_macs(method, k)
        return self._macs[(method, k)]

    # -- one row: one device job -------------------------------------------------------------
    def train_eval(
        self, v: Variant, k: int | None, seed: int, train_ids: list[str] | None
    ) -> RowResult:
        if self.source is None or self.profile is None:
            raise ConfigError("Comparison.train_eval needs a feature source and a device profile")
        tcfg = TrainConfig.for_method(
            v.method,
            epochs=self.cfg.epochs,
            seed=seed,
            micro_batch=self.cfg.micro_batch,
            batch_size=self.cfg.batch_size,
        )
        device = EdgeDevice(self.profile, self.source, self.cfg.storage, counts_runtime=False)
        with device:  # pull the row's splits into the device's cache (bytes and link charged)
            ids = {**self.ids, "train": train_ids}
            splits = [
                device.features(self.task_spec, s, v.method, k, v.dtype, ids[s]) for s in SPLITS
            ]
            train, val, test = splits
        # The measured job, on the same device (its metrics accumulate): memory is metered from
        # here, so a fresh run and a cached rerun report the same peak (the pull's buffers,
        # the in-process cloud's among them, are not the edge job's).
        with device:
            torch.manual_seed(seed)
            net = device.new_net(v.method, self.task.num_classes, k, wire=v.dtype)
            device.train(net, train, tcfg)
            val_acc = device.evaluate(net, val)
            acc = device.evaluate(net, test)
        m = device.report()
        bpi = bytes_per_image(splits)
        log.info(
            "%s %s [%s] k=%s seed %d: val %.4f test %.4f (%.0f B/img, +%.0f MB, %.1fs host)",
            self.task_spec,
            v.label,
            v.dtype,
            k,
            seed,
            val_acc,
            acc,
            bpi,
            m.peak_mem_mb,
            m.host_compute_s,
        )
        return RowResult(
            label=v.label,
            method=v.method,
            wire_dtype=v.dtype,
            task=self.task_spec,
            seed=seed,
            group=v.group,
            k=k,
            accuracy=acc,
            val_accuracy=val_acc,
            bytes_per_image=bpi,
            cloud_macs=self.cloud_macs(v.method, k),
            profile=self.profile.name,
            device=m,
        )

    # -- one seed --------------------------------------------------------------------------
    def run_seed(
        self,
        variants: Sequence[Variant],
        seed: int,
        shots: int | None = None,
        prior: Sequence[RowResult] = (),
    ) -> Iterator[RowResult]:
        """Each variant's row for ``seed``, yielded as its fit ends.

        ``prior``: this seed's rows of an earlier, stopped run (``--resume``): their variants are
        not yielded again and their fits are not repeated (a k selection reuses them too).
        """
        train_ids = self.ids["train"]
        if shots is not None:
            split = self.task.split("train")
            train_ids = few_shot_ids(split.ids, split.labels, shots, seed)
        done = {(r.label, r.wire_dtype): r for r in prior}
        cache: dict[tuple[str, str, int | None], RowResult] = {
            (r.method, r.wire_dtype, r.k): r for r in prior
        }

        def row(v: Variant, k: int | None) -> RowResult:
            key = (v.method, v.dtype, k)
            if key not in cache:
                cache[key] = self.train_eval(v, k, seed, train_ids)
            return cache[key]

        def selected(v: Variant) -> RowResult:
            rows = {k: row(v, k) for k in self.ks_for(v)}
            k = best_k({k: r.val_accuracy for k, r in rows.items()})  # the device's own rule
            return replace(rows[k], label=v.label, group=v.group)

        mist_k: list[int | None] = []

        def chosen_k() -> int | None:
            if not mist_k:  # --mist-k fixes it: no float32 MIST row is trained just to read it
                fixed = self.cfg.mist_k
                mist_k.append(fixed if fixed is not None else selected(Variant("mist", "mist")).k)
            return mist_k[0]

        for v in variants:
            kept = done.get((v.label, v.dtype))
            if kept is not None:
                r = kept
            elif v.k == "select":
                r = selected(v)
            elif v.k == "mist":
                r = replace(row(v, chosen_k()), label=v.label, group=v.group)
            elif isinstance(v.k, int):
                r = replace(row(v, self.ks[v.k]), label=v.label, group=v.group)
            else:
                r = replace(row(v, None), label=v.label, group=v.group)
            if v.k == "select" and v.method == "mist" and v.dtype == "float32":
                mist_k[:] = [r.k]
            if kept is None:
                yield replace(r, shots=shots)


def run_compare(
    cfg: CompareConfig,
    on_row: Callable[[RowResult], None] | None = None,
    prior: Sequence[Mapping[str, Any]] = (),
) -> list[RowResult]:
    """Every variant x task x seed (x shots in few-shot mode) through cloud, wire and device;
    ``on_row`` sees each row as its fit ends.

    ``prior``: the rows of an earlier, stopped run (``--resume``), read before any row runs;
    only the rows they lack run.
    """
    earlier: dict[tuple[str, int | None, int], list[RowResult]] = {}  # (task, shots, seed)
    for r in map(RowResult.from_dict, prior):
        earlier.setdefault((r.task, r.shots, r.seed), []).append(r)
    # Before the backbone and the embedding: their freed blocks then go back to the OS instead
    # of staying resident in the heap, where the devices' jobs would reuse them unmetered.
    tune_allocator()
    variants = list(cfg.variants or default_variants())
    profile = load_profile(cfg.profile)
    backbone = create_backbone(cfg.backbone, random_init=cfg.random_init, **cfg.backbone_kwargs)
    serve = ServeConfig(
        port=0,
        tasks=tuple(cfg.tasks),
        backbone=cfg.backbone,
        random_init=cfg.random_init,
        model_kwargs=dict(cfg.backbone_kwargs),
        cache_dir=cfg.cache_dir,
        numerics=cfg.numerics,
    )
    log.info("every row runs on one %s device, storage %s", profile.name, cfg.storage)
    results: list[RowResult] = []
    with (
        running_cloud(serve, backbone=backbone) as location,
        FlightSource(location, expect_backbone=backbone.name) as source,
    ):
        for spec in cfg.tasks:
            task = get_task(spec)
            cmp = Comparison(
                cfg,
                task,
                spec,
                backbone.num_blocks,
                source,
                profile,
                lambda m, k: cloud_macs(backbone, m, k),
            )
            pairs = cmp.pairs(variants)
            started = time.perf_counter()
            for split in SPLITS:
                s = task.split(split)
                ids = cmp.ids[split]
                rows = list(range(len(s) if ids is None else len(ids)))
                if split == "train" and cfg.few_shot:
                    rows = list(range(len(s)))
                source.client.warm(
                    spec, split, [(g.kind, g.k, d) for g, d in pairs], limit=len(rows)
                )
            took = time.perf_counter() - started
            log.info("%s: embedding phase %.0f s (%d gather/wire pairs)", spec, took, len(pairs))
            for shots in cfg.few_shot or (None,):
                for seed in range(cfg.seeds):
                    kept = earlier.get((spec, shots, seed), [])
                    if kept:
                        log.info(
                            "%s shots=%s seed %d: %d rows kept from the resumed run",
                            *(spec, shots, seed, len(kept)),
                        )
                    for r in cmp.run_seed(variants, seed, shots, kept):
                        results.append(r)
                        if on_row is not None:
                            on_row(r)
    return results
