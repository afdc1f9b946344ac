"""The paper's Table 1 (and Figures 4 and 5) through our own pipeline: cloud -> wire -> edge.

Every row is a :class:`Variant`: a separated-tuning method, the wire dtype its features are
streamed in, and how its ``k`` is set. For each task the cloud (a real
:func:`~mist_fed.cloud.runner.running_cloud` Flight server) first fills its store from one
backbone pass per image (:func:`~mist_fed.cloud.precompute.precompute`); then each variant's
splits are streamed through :class:`~mist_fed.wire.client.FeatureClient`, and the edge trainer
fits and evaluates its network. Bytes per image are the bytes the client actually received
divided by the rows received; edge peak memory is the rise of this process's peak RSS during
``fit`` (activations, gradients, optimizer: the resident features are counted apart, in
``edge_feature_mb``).

k: MIST trains one LAE per candidate ``k`` (the rows ``mist k=..``, the paper's Figure 5) and
the ``mist`` row is the one best on validation. ``gather_linear`` selects its own ``k``; the
block-function ablations and the compressed wires use MIST's chosen ``k`` for that seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.precompute import precompute
from mist_fed.cloud.runner import running_cloud
from mist_fed.data import get_task
from mist_fed.data.registry import Task
from mist_fed.device.memory import peak_rss_mb, reset_peak_rss, rss_mb, tune_allocator
from mist_fed.device.trainer import TrainConfig, evaluate, fit
from mist_fed.errors import ConfigError
from mist_fed.model.backbone import Backbone, create_backbone
from mist_fed.core.cost import MethodCost
from mist_fed.model.cost import method_cost
from mist_fed.core.specs import GatherSpec, candidate_ks
from mist_fed.core.methods import build_edge_net, get_method, method_gather
from mist_fed.wire.client import FeatureClient
from mist_fed.wire.dtypes import feature_bytes
from mist_fed.wire.features import FeatureSet

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
K_NAMES = ("N/3", "2N/3", "N")  # the candidate depths, in order (the paper's Figure 5)


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
    cache_dir: str | None = None
    fetch_chunk: int = 64  # ids per request when features are re-cast to fp16 on arrival
    side_resident: str = "float16"  # side's [N+1, T, D] maps are kept in this dtype on the edge

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("give at least one task (--tasks)")
        if self.seeds < 1 or self.epochs < 1:
            raise ConfigError(f"seeds and epochs must be >= 1 (got {self.seeds}, {self.epochs})")
        for v in self.variants or default_variants():
            get_method(v.method)
        if self.mist_k is not None and self.mist_k < 1:
            raise ConfigError(f"--mist-k must be >= 1, got {self.mist_k}")


@dataclass
class RowResult:
    label: str
    method: str
    wire_dtype: str
    task: str
    seed: int
    group: str
    k: int | None
    accuracy: float
    val_accuracy: float
    transfer_bytes_per_image: float
    edge_peak_mem_mb: float
    edge_feature_mb: float
    train_seconds: float
    cost: MethodCost
    shots: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "cost"}
        c = self.cost
        d.update(edge_params=c.edge_params, edge_macs=c.edge_macs, cloud_macs=c.cloud_macs)
        return d


def _ids_subset(ids: Sequence[str], limit: int | None) -> list[str]:
    return list(ids if limit is None else ids[:limit])


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


class Fetcher:
    """Streams a split's features for one (gather spec, dtype), accounting every wire byte."""

    def __init__(self, client: FeatureClient, task: str, chunk: int) -> None:
        self.client = client
        self.task = task
        self.chunk = chunk
        self.bytes = 0
        self.rows = 0

    def get(
        self, split: str, ids: list[str], spec: GatherSpec, dtype: str, resident: str | None
    ) -> FeatureSet:
        """The rows ``ids``; with ``resident`` they are cast on arrival, ``chunk`` ids at a time."""
        step = self.chunk if resident else len(ids)
        parts: list[FeatureSet] = []
        for start in range(0, len(ids), max(step, 1)):
            fs = self.client.get(
                self.task, split, spec.kind, spec.k, dtype, ids=ids[start : start + step]
            )
            self.bytes += int(fs.meta["wire"]["bytes"])
            self.rows += int(fs.meta["wire"]["rows"])
            if resident:
                fs.features = fs.features.to(getattr(torch, resident))
            parts.append(fs)
        if len(parts) == 1:
            return parts[0]
        return FeatureSet(
            [i for p in parts for i in p.ids],
            torch.cat([p.labels for p in parts]),
            torch.cat([p.features for p in parts]),
            dict(parts[0].meta),
        )

    @property
    def bytes_per_image(self) -> float:
        return self.bytes / self.rows if self.rows else math.nan


def measure_fit(net: torch.nn.Module, train: FeatureSet, cfg: TrainConfig) -> tuple[float, float]:
    """Train; returns (host seconds, peak RSS rise in MB during the fit)."""
    base = rss_mb()
    reset_peak_rss()
    res = fit(net, train, cfg)
    return res.seconds, max(0.0, peak_rss_mb() - base)


class Comparison:
    """Runs the variants of one task against a running cloud (see the module docstring)."""

    def __init__(
        self,
        cfg: CompareConfig,
        backbone: Backbone,
        client: FeatureClient,
        task: Task,
        task_spec: str,
    ) -> None:
        self.cfg = cfg
        self.backbone = backbone
        self.client = client
        self.task = task
        self.task_spec = task_spec
        self.ks = candidate_ks(backbone.num_blocks)
        if cfg.mist_k is not None and cfg.mist_k > backbone.num_blocks:
            raise ConfigError(
                f"--mist-k {cfg.mist_k} is deeper than the backbone's {backbone.num_blocks} blocks"
            )
        self._costs: dict[tuple[str, int | None, str], MethodCost] = {}
        self.ids = {s: _ids_subset(task.split(s).ids, cfg.limits.get(s)) for s in SPLITS}

    # -- pieces ----------------------------------------------------------------------------
    def cost(self, method: str, k: int | None, dtype: str) -> MethodCost:
        key = (method, k, dtype)
        if key not in self._costs:
            shape = self.backbone.geometry.shape(self.spec(method, k))
            self._costs[key] = method_cost(
                self.backbone,
                method,
                self.task.num_classes,
                k=k,
                bytes_per_image=feature_bytes(shape, dtype),
            )
        return self._costs[key]

    def spec(self, method: str, k: int | None) -> GatherSpec:
        return method_gather(method, self.backbone.num_blocks, k)

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

    def train_eval(self, v: Variant, k: int | None, seed: int, train_ids: list[str]) -> RowResult:
        spec = self.spec(v.method, k)
        resident = self.cfg.side_resident if v.method == "side" else None
        fetch = Fetcher(self.client, self.task_spec, self.cfg.fetch_chunk)
        train = fetch.get("train", train_ids, spec, v.dtype, resident)
        val = fetch.get("val", self.ids["val"], spec, v.dtype, resident)
        feature_mb = train.features.element_size() * train.features.nelement() / 2**20
        tcfg = TrainConfig.for_method(
            v.method,
            epochs=self.cfg.epochs,
            seed=seed,
            micro_batch=self.cfg.micro_batch,
            batch_size=self.cfg.batch_size,
        )
        torch.manual_seed(seed)
        net = build_edge_net(
            v.method,
            self.backbone.geometry,
            self.task.num_classes,
            self.backbone.edge_init_state(v.method),
        )
        seconds, peak = measure_fit(net, train, tcfg)
        del train
        val_acc = evaluate(net, val)
        del val
        test = fetch.get("test", self.ids["test"], spec, v.dtype, resident)
        acc = evaluate(net, test)
        del test
        log.info(
            "%s %s [%s] k=%s seed %d: val %.4f test %.4f (%.0f B/img, +%.0f MB, %.0fs)",
            self.task_spec,
            v.label,
            v.dtype,
            k,
            seed,
            val_acc,
            acc,
            fetch.bytes_per_image,
            peak,
            seconds,
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
            transfer_bytes_per_image=fetch.bytes_per_image,
            edge_peak_mem_mb=peak,
            edge_feature_mb=feature_mb,
            train_seconds=seconds,
            cost=self.cost(v.method, k, v.dtype),
        )

    # -- one seed --------------------------------------------------------------------------
    def run_seed(
        self, variants: Sequence[Variant], seed: int, shots: int | None = None
    ) -> list[RowResult]:
        train_ids = self.ids["train"]
        if shots is not None:
            split = self.task.split("train")
            train_ids = few_shot_ids(split.ids, split.labels, shots, seed)
        out: list[RowResult] = []
        cache: dict[tuple[str, str, int | None], RowResult] = {}

        def row(v: Variant, k: int | None) -> RowResult:
            key = (v.method, v.dtype, k)
            if key not in cache:
                cache[key] = self.train_eval(v, k, seed, train_ids)
            return cache[key]

        def selected(v: Variant) -> RowResult:
            rows = [row(v, k) for k in self.ks_for(v)]
            best = max(rows, key=lambda r: (r.val_accuracy, -(r.k or 0)))
            return replace(best, label=v.label, group=v.group)

        mist_k: list[int | None] = []

        def chosen_k() -> int | None:
            if not mist_k:
                mist_k.append(selected(Variant("mist", "mist")).k)
            return mist_k[0]

        for v in variants:
            if v.k == "select":
                r = selected(v)
                if v.method == "mist" and v.dtype == "float32":
                    mist_k[:] = [r.k]
            elif v.k == "mist":
                r = replace(row(v, chosen_k()), label=v.label, group=v.group)
            elif isinstance(v.k, int):
                r = replace(row(v, self.ks[v.k]), label=v.label, group=v.group)
            else:
                r = replace(row(v, None), label=v.label, group=v.group)
            out.append(replace(r, shots=shots))
        return out


#: One seed's run of every variant on a task: (task spec, shots or None, seed).
SeedKey = tuple[str, int | None, int]


def seeds_done(rows: Sequence[dict[str, Any]], variants: Sequence[Variant]) -> set[SeedKey]:
    """The (task, shots, seed) runs for which ``rows`` (an earlier run's) hold every variant."""
    have: dict[SeedKey, set[tuple[str, str]]] = {}
    for r in rows:
        shots = r.get("shots")  # None outside few-shot mode (resumed_rows turns NaN into None)
        key = (str(r["task"]), None if shots is None else int(shots), int(r["seed"]))
        have.setdefault(key, set()).add((str(r["label"]), str(r["wire_dtype"])))
    want = {(v.label, v.dtype) for v in variants}
    return {key for key, got in have.items() if want <= got}


def run_compare(
    cfg: CompareConfig,
    on_row: Callable[[RowResult], None] | None = None,
    skip: Collection[SeedKey] = (),
) -> list[RowResult]:
    """Every variant x task x seed (x shots in few-shot mode) through cloud, wire and edge.

    ``skip``: seeds already done (:func:`seeds_done` of an earlier run's rows), not rerun.
    """
    tune_allocator()
    variants = list(cfg.variants or default_variants())
    backbone = create_backbone(cfg.backbone, random_init=cfg.random_init, **cfg.backbone_kwargs)
    serve = ServeConfig(
        port=0,
        tasks=tuple(cfg.tasks),
        backbone=cfg.backbone,
        random_init=cfg.random_init,
        model_kwargs=dict(cfg.backbone_kwargs),
        cache_dir=cfg.cache_dir,
    )
    results: list[RowResult] = []
    with (
        running_cloud(serve, backbone=backbone) as location,
        FeatureClient(location, expect_backbone=backbone.name, timeout_s=600.0) as client,
    ):
        for spec in cfg.tasks:
            task = get_task(spec)
            cmp = Comparison(cfg, backbone, client, task, spec)
            pairs = cmp.pairs(variants)
            for split in SPLITS:
                s = task.split(split)
                rows = list(range(len(cmp.ids[split])))
                if split == "train" and cfg.few_shot:
                    rows = list(range(len(s)))
                precompute(backbone, serve.store_dir, s, rows, pairs)
            for shots in cfg.few_shot or (None,):
                for seed in range(cfg.seeds):
                    if (spec, shots, seed) in skip:
                        log.info("%s shots=%s seed %d: done in the resumed run", spec, shots, seed)
                        continue
                    for r in cmp.run_seed(variants, seed, shots):
                        results.append(r)
                        if on_row is not None:
                            on_row(r)
    return results


def default_store_dir(cache_dir: str | None) -> Path:
    return ServeConfig(cache_dir=cache_dir).store_dir
