"""``EdgeDevice``: the one way any entry point fetches, caches, trains, evaluates and measures.

A device is a profile (cores, memory, link, compute), a :class:`~mist_fed.device.source.FeatureSource`
and a storage directory. Used as a context manager it sets torch's threads from the profile
and runs one memory meter (:class:`~mist_fed.device.memory.MemoryGuard`: peak RSS, file-backed
pages included, against the profile's cap) over everything inside. Then:

* :meth:`features` pulls a split once over the link into the on-device cache
  (:mod:`mist_fed.device.cache`) and returns it for batch-by-batch reads; bytes are counted
  when paid, once: a split found in the cache costs nothing. A projected wire's features are
  pinned to the first projection id the device sees for them (task, gather, k, wire): features
  projected with another basis are refused, whether from the cache or the cloud;
* :meth:`new_net` sizes the method's edge net from the cloud's geometry and the wire (a
  projected wire's ``D`` channels; Partial-1 starts from the pretrained block the cloud serves,
  fetched and cached once);
* :meth:`train`, :meth:`evaluate` and :meth:`select_k` run the trainer and charge the virtual
  clock: the job's FLOPs on its own net over the profile's GFLOP/s (host time measured beside);
  :meth:`predict` classifies the device's own images (``mist-fed client predict``);
* :meth:`report` is the :class:`DeviceMetrics` every caller writes: ``metrics.json`` (client),
  ``devices.parquet`` (fleet) and ``compare.parquet`` (comparison) share its names.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from weakref import WeakKeyDictionary

import pyarrow as pa
import torch
from torch import nn

from mist_fed.core.cost import EdgeCost, net_cost
from mist_fed.core.methods import build_edge_net, get_method, method_gather, starts_from_backbone
from mist_fed.core.specs import GatherSpec, Geometry
from mist_fed.device.cache import CachedSplit, CacheKey, FeatureCache
from mist_fed.device.clock import EVAL_FLOPS_PER_MAC, TRAIN_FLOPS_PER_MAC, DeviceClock
from mist_fed.device.memory import MemoryGuard, check_fits, estimate_train_mb, tune_allocator
from mist_fed.device.metrics import DeviceMetrics, KSelection, Prediction, best_k
from mist_fed.device.profiles import DeviceProfile, profile_resources
from mist_fed.device.source import FeatureSource
from mist_fed.device.trainer import (
    ExtraLoss,
    FitResult,
    TrainConfig,
    TrainData,
    evaluate,
    fit,
    predict,
)
from mist_fed.device.upload import upload_split
from mist_fed.errors import ConfigError, WireError
from mist_fed.files import write_bytes_atomic
from mist_fed.wire import edge_init as init_codec
from mist_fed.wire.codec import WireMeta
from mist_fed.wire.dtypes import wire_projection, wire_shape

LocalImages = Callable[[str, str], list[tuple[str, bytes, int]]]  # (task, split) -> images

log = logging.getLogger(__name__)


class EdgeDevice:
    """One edge device (see the module docstring)."""

    def __init__(
        self,
        profile: DeviceProfile,
        source: FeatureSource,
        storage: str | Path,
        *,
        hard_memory_limit: bool = False,
        counts_runtime: bool = True,
        local_images: LocalImages | None = None,
        progress: bool = False,
    ) -> None:
        """``local_images(task, split)``: the device's own ``(id, encoded image, label)``
        triples; given, features are made by uploading them (``do_exchange``) instead of
        asking the cloud for the task's split by reference."""
        self.profile = profile
        self.source = source
        self.storage = Path(storage)
        self.cache = FeatureCache(self.storage / "features")
        self.plan = profile_resources(profile)
        self.clock = DeviceClock(profile)
        self.guard = MemoryGuard(
            profile.memory_mb, profile.name, hard=hard_memory_limit, counts_runtime=counts_runtime
        )
        self.metrics = DeviceMetrics(
            mem_cap_mb=float(profile.memory_mb),
            device_gflops=profile.gflops,
            torch_threads=self.plan.torch_threads,
        )
        self.local_images = local_images
        self.progress = progress  # bars on stderr for downloads and training (a terminal's)
        self._splits: dict[CacheKey, CachedSplit] = {}
        self._bases: dict[tuple[str, ...], str] = {}  # pinned projection ids (see features)
        self._inits: dict[str, dict[str, torch.Tensor]] = {}
        self._costs: WeakKeyDictionary[nn.Module, EdgeCost] = WeakKeyDictionary()
        self._threads = 0
        self._inside = False  # within the ``with`` block: the meter is running

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> EdgeDevice:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(self.plan.torch_threads)
        tune_allocator()
        self.guard.__enter__()
        self._inside = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._inside = False
        try:
            self.guard.__exit__(exc_type, exc, tb)
        finally:
            self._settle()
            torch.set_num_threads(self._threads)

    def _settle(self) -> None:
        m, c = self.metrics, self.clock
        m.bytes_down, m.bytes_up = c.bytes_down, c.bytes_up
        m.transfer_s, m.compute_s, m.host_compute_s = (
            c.transfer_s,
            c.compute_device_s,
            c.compute_host_s,
        )
        m.peak_rss_mb, m.peak_mem_mb = self.guard.peak_mb, self.guard.rise_mb
        m.host_gflops = c.host_gflops

    def report(self) -> DeviceMetrics:
        """The metrics so far (final once the ``with`` block has exited: what the process does
        after it is not this device's)."""
        if self._inside:
            self.guard.measure()
            self._settle()
        return self.metrics

    # -- what the cloud serves ---------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        return self.source.geometry()

    def spec(self, method: str, k: int | None = None) -> GatherSpec:
        return method_gather(method, self.geometry.num_blocks, k)

    def feature_shape(self, method: str, k: int | None, wire: str) -> tuple[int, ...]:
        """Per-image features of ``method`` at ``k`` as ``wire`` sends them."""
        try:
            return wire_shape(self.geometry.shape(self.spec(method, k)), wire)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def pin_basis(self, key: CacheKey, basis: str) -> None:
        """Refuse features projected with another basis than the first seen for ``key``'s kind."""
        kind = (key.backbone, key.weights, key.task, key.gather, str(key.k), key.dtype)
        pinned = self._bases.setdefault(kind, basis)
        if basis != pinned:
            held = [
                f"{k.label()} in {self.cache.root / k.digest()}.*"
                for k, split in self._splits.items()
                if split.meta.basis == pinned and k.dtype == key.dtype
            ]
            raise WireError(
                f"{key.label()}: features projected with basis {basis or '(none)'}, but this "
                f"device pinned {pinned} for them (the cloud refitted its projection?); "
                "features of two bases cannot train or be scored by one net"
                + (f". Delete the device's {'; '.join(held)} to use the new one" if held else "")
            )

    def candidate_ks(self, method: str, ks: Sequence[int] | None = None) -> list[int | None]:
        """The ``k`` values to select among: ``ks`` if given, else the method's candidates."""
        if not get_method(method).tunes_k:
            return [None]
        return list(ks) if ks else list(self.geometry.candidate_ks)

    def features(
        self,
        task: str,
        split: str,
        method: str,
        k: int | None,
        dtype: str,
        ids: Sequence[str] | None = None,
    ) -> CachedSplit:
        """``split``'s features for ``method`` at ``k``, from the cache or pulled into it once."""
        spec = self.spec(method, k)
        g = self.geometry
        key = CacheKey(
            g.backbone, g.weights, task, split, spec.kind, spec.k, dtype,
            None if ids is None else tuple(ids),
        )  # fmt: skip
        if key in self._splits:
            return self._splits[key]
        cached = self.cache.open(key)
        if cached is not None:
            log.info("%s: %d rows from the device cache (0 bytes)", key.label(), cached.rows)
            self.pin_basis(key, cached.meta.basis)
        else:
            before = self.source.bytes_received
            if self.local_images is not None:
                images = self.local_images(task, split)
                schema, batches = upload_split(
                    self.source, self.clock, self.geometry, images, split, spec, dtype
                )
            else:
                schema, batches = self.source.stream(task, split, spec, dtype, ids)
            self.pin_basis(key, WireMeta.from_schema(schema).basis)  # before it is cached
            if self.progress and self.local_images is not None:  # a stream counts itself
                batches = _rows_bar(batches, f"{split} {spec.label()} {dtype}")
            cached = self.cache.store(
                key, schema, batches, paid=lambda: self.source.bytes_received - before
            )
            self._paid(cached.paid_bytes, cached.rows)
            log.info(
                "%s: %d rows, %d bytes over the link", key.label(), cached.rows, cached.paid_bytes
            )
        self._splits[key] = cached
        return cached

    def _paid(self, nbytes: int, rows: int) -> None:
        self.clock.add_download(nbytes)
        self.metrics.feature_bytes += nbytes
        self.metrics.images_down += rows
        self.metrics.requests += 1

    def download_weights(self, nbytes: int) -> None:
        """Charge the link for weights sent to the device (a fleet's global model)."""
        self.clock.add_download(nbytes)
        self.metrics.requests += 1

    def upload_weights(self, nbytes: int) -> None:
        self.clock.add_upload(nbytes)

    def edge_init(self, method: str) -> dict[str, torch.Tensor] | None:
        """The pretrained weights ``method``'s net starts from (Partial-1), fetched once."""
        if not starts_from_backbone(method):
            return None
        if method not in self._inits:
            g = self.geometry
            tag = hashlib.sha256(f"{g.backbone}|{g.weights}|{method}".encode()).hexdigest()[:16]
            path = self.storage / "init" / f"{method}-{tag}.safetensors"
            init: init_codec.EdgeInit | None = None
            if path.is_file():
                try:
                    init = init_codec.decode(path.read_bytes())
                except WireError as e:
                    log.warning(
                        "cached initial weights %s are unreadable (%s); fetching again", path, e
                    )
            if init is None:
                init = self.source.edge_init(method)
                self.clock.add_download(init.nbytes)
                self.metrics.init_bytes_down += init.nbytes
                self.metrics.requests += 1
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(path, init_codec.encode(init))
            self._inits[method] = init.state
        return self._inits[method]

    # -- the edge net ------------------------------------------------------------------------
    def new_net(
        self,
        method: str,
        num_classes: int,
        k: int | None = None,
        state: dict[str, torch.Tensor] | None = None,
        wire: str = "float32",
        **edge_kwargs: Any,
    ) -> nn.Module:
        """``method``'s edge net for this cloud and ``wire``; ``state`` (e.g. a fleet's global
        model) loaded.

        Given ``state``, a method that starts from the backbone (Partial-1) takes its
        pretrained part from it (same keys) and fetches no initial weights.
        """
        init = state if state is not None and starts_from_backbone(method) else None
        net = build_edge_net(
            method,
            self.geometry,
            num_classes,
            init or self.edge_init(method),
            projection=wire_projection(wire),
            **edge_kwargs,
        )
        if state is not None:
            net.load_state_dict(state)
        self._runs(net, self.feature_shape(method, k, wire))
        return net

    def _runs(self, net: nn.Module, shape: tuple[int, ...]) -> EdgeCost:
        """``net`` is the one the device runs: its cost (counted once per net) goes in the
        metrics; its forward MACs per image are what the clock charges for."""
        cost = self._costs.get(net)
        if cost is None:
            cost = self._costs[net] = net_cost(net, shape)
        self.metrics.edge_params, self.metrics.edge_macs = cost.edge_params, cost.edge_macs
        return cost

    def train(
        self,
        net: nn.Module,
        data: TrainData,
        cfg: TrainConfig,
        extra_loss: ExtraLoss | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> FitResult:
        """Fit ``net`` on ``data`` under the memory cap; charges the clock its device time."""
        micro = cfg.micro_batch or cfg.batch_size
        work = estimate_train_mb(0, data.shape, 4, micro, grad_checkpointing=cfg.grad_checkpointing)
        base = self.guard.baseline_mb if self.guard.counts_runtime else 0.0
        check_fits(base + work, self.profile.memory_mb, self.profile.name, "training")
        macs = self._runs(net, data.shape).edge_macs

        bar = None
        if self.progress:
            from tqdm import tqdm

            total = math.ceil(data.labelled / cfg.batch_size) * cfg.epochs
            bar = tqdm(total=total, desc=f"train {type(net).__name__}", unit="step", leave=False)

        def step(i: int, loss: float) -> None:
            self.guard.check()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if on_step is not None:
                on_step(i, loss)

        try:
            res = fit(net, data, cfg, on_step=step, extra_loss=extra_loss)
        finally:
            if bar is not None:
                bar.close()
        self.clock.add_compute(res.seconds, TRAIN_FLOPS_PER_MAC * macs * res.samples)
        self.metrics.train_steps += res.steps
        return res

    def evaluate(self, net: nn.Module, data: TrainData) -> float:
        """Top-1 accuracy on ``data``, read batch by batch; charges the clock."""
        macs = self._runs(net, data.shape).edge_macs
        t0 = time.perf_counter()
        acc = evaluate(net, data)
        self.guard.check()
        flops = EVAL_FLOPS_PER_MAC * macs * data.labelled
        self.clock.add_compute(time.perf_counter() - t0, flops)
        return acc

    def predict(
        self,
        net: nn.Module,
        method: str,
        k: int | None,
        dtype: str,
        images: Sequence[tuple[str, bytes]],
        basis: str = "",
    ) -> Prediction:
        """Class probabilities of the device's own ``(id, encoded image)`` pairs: uploaded,
        embedded by the cloud, classified by ``net`` (trained on ``method`` at ``k`` on the
        ``dtype`` wire, projected with ``basis``). Features of another basis are refused.
        Charges the link both ways and the clock; runs under the memory meter."""
        self.clock.add_upload(sum(len(b) for _, b in images))
        before = self.source.bytes_received
        fs = self.source.embed(images, self.spec(method, k), dtype)
        self._paid(self.source.bytes_received - before, len(fs))
        got = str(fs.meta.get("basis", ""))
        if got != basis:
            raise WireError(
                f"the cloud sent features projected with basis {got or '(none)'}; this model "
                f"was trained on basis {basis or '(none)'} of {dtype}: retrain it on this "
                "cloud's features"
            )
        errors = {str(i): str(r) for i, r in fs.meta.get("errors", {}).items()}
        if not len(fs):
            return Prediction([], torch.empty(0), errors)
        macs = self._runs(net, fs.shape).edge_macs
        t0 = time.perf_counter()
        probs = predict(net, fs.features).softmax(1)
        self.guard.check()
        self.clock.add_compute(time.perf_counter() - t0, EVAL_FLOPS_PER_MAC * macs * len(fs))
        return Prediction(list(fs.ids), probs, errors)

    def select_k(
        self,
        task: str,
        method: str,
        dtype: str,
        num_classes: int,
        cfg: TrainConfig,
        ks: Sequence[int] | None = None,
        train_ids: Sequence[str] | None = None,
        **edge_kwargs: Any,
    ) -> KSelection:
        """Train one net per candidate ``k`` and keep the best on validation (ties: smaller k).

        Each net starts from the same seed; a method without ``k`` trains once.
        """
        val_acc: dict[int | None, float] = {}
        kept: tuple[nn.Module, FitResult] | None = None
        for k in sorted(self.candidate_ks(method, ks), key=lambda v: -1 if v is None else v):
            train = self.features(task, "train", method, k, dtype, train_ids)
            val = self.features(task, "val", method, k, dtype)
            torch.manual_seed(cfg.seed)
            net = self.new_net(method, num_classes, k, wire=dtype, **edge_kwargs)
            fitted = self.train(net, train, cfg)
            val_acc[k] = self.evaluate(net, val)
            log.info("k=%s: val accuracy %.4f", k, val_acc[k])
            if best_k(val_acc) == k:  # the best so far: keep its net, drop the one before
                kept = (net, fitted)
        chosen = best_k(val_acc)  # ConfigError when there is no candidate
        assert kept is not None
        self._runs(kept[0], self.feature_shape(method, chosen, dtype))  # the one it keeps
        return KSelection(k=chosen, val_acc=val_acc, net=kept[0], fit=kept[1])


def _rows_bar(batches: Iterator[pa.RecordBatch], desc: str) -> Iterator[pa.RecordBatch]:
    """``batches``, counted on a progress bar in rows as they arrive."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit="img", leave=False) as bar:
        for b in batches:
            bar.update(b.num_rows)
            yield b
