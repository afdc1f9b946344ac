"""The feature service: one frozen backbone, its embedder and store, and every request's logic.

:class:`FeatureService` owns what the cloud is (backbone, numerics, store, projections, the
counters) and answers in plain Python: which rows a request names, a stream's batches, a
device's uploaded images embedded, ``warm`` (the one way to fill the store ahead of a run),
a method's initial edge weights, the stats. It is the store's one writer.
:class:`~mist_fed.cloud.server.FeatureServer` is the thin Arrow Flight adapter around it
(tickets, auth, TLS, Flight errors).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa

from mist_fed.assets.defaults import OFFLINE_BACKBONE, PAPER_BACKBONE, choose_backbone
from mist_fed.cloud.backbone import Backbone, create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.embed import Embedder, ImageLoader, decode_image, image_hash
from mist_fed.cloud.projections import Projections, project_columns, wire_meta
from mist_fed.cloud.store import FeatureStore
from mist_fed.core.specs import GatherSpec
from mist_fed.data import get_task
from mist_fed.data.tasks import Task, TaskSplit
from mist_fed.errors import MistError, TaskError, WireError
from mist_fed.wire import edge_init
from mist_fed.wire.codec import Stats, WireMeta, assemble_batch, feature_schema
from mist_fed.wire.dtypes import stored_dtype
from mist_fed.wire.projection import Projection
from mist_fed.wire.request import FeatureRequest

log = logging.getLogger(__name__)


def resolve_backbone(config: ServeConfig) -> tuple[ServeConfig, str]:
    """``config`` with its backbone named, and why that one (chosen from local state if unset)."""
    if config.backbone is not None:
        return config, "named in the config or by --backbone"
    if config.random_init:  # random weights: no file needed, the offline architecture
        return config.override(backbone=OFFLINE_BACKBONE), "random init asked for"
    if config.weights is not None:  # a weights file and no name: the paper's backbone's file
        return config.override(backbone=PAPER_BACKBONE), f"weights file {config.weights} given"
    choice = choose_backbone()  # WeightsUnavailableError: one line saying what to do
    return config.override(backbone=choice.name, weights=choice.weights), choice.why


def build_backbone(config: ServeConfig) -> Backbone:
    config, _ = resolve_backbone(config)
    assert config.backbone is not None
    return create_backbone(
        config.backbone,
        weights=config.weights,
        random_init=config.random_init,
        seed=config.seed,
        **config.model_kwargs,
    )


def _json_kwargs(backbone: Backbone) -> dict[str, Any]:
    """The backbone's timm kwargs, for clients that rebuild part of it (Partial-1 checkpoints)."""
    kw = dict(backbone.spec.model_kwargs)
    try:
        json.dumps(kw)
    except (TypeError, ValueError):
        log.warning("backbone kwargs %r are not JSON; clients will not be told them", kw)
        return {}
    return kw


class FeatureService:
    """Gather* (and baseline) features of a frozen backbone, embedded once and stored."""

    def __init__(self, config: ServeConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.offered = config.offered_tasks()
        base = backbone if backbone is not None else build_backbone(config)
        numerics, runtime, self.numerics_why = config.backbone_numerics()
        self.backbone = base.configured(numerics, runtime)  # its weights_id names the numerics
        self._model_kwargs = _json_kwargs(self.backbone)
        self.store = FeatureStore(
            config.store_dir, self.backbone.weights_id, max_bytes=int(config.max_gb * 1e9)
        )
        self.embedder = Embedder(
            self.backbone, self.store, config.forward_batch(), config.torch_device()
        )
        self.projections = Projections(
            self.embedder,
            self.store.root / "projections" if self.store.persistent else None,
            self.train_images,
            config.projection_sample,
            config.projection_images,
            config.rows_per_batch,
        )
        self.served = Stats()
        self.requests = {"do_get": 0, "do_exchange": 0, "edge_init": 0, "refused": 0}
        self._tasks: dict[str, Task] = {}
        self._hashes: dict[tuple[str, str], list[str | None]] = {}
        self._columns: dict[tuple[str, str], tuple[list[str], list[int]]] = {}
        self._edge_init: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def task(self, spec: str, download: bool = True) -> Task:
        with self._lock:
            task = self._tasks.get(spec)
        if task is None:
            # Only the tasks the operator offers: a task spec from the network must not make
            # the server build arbitrary tasks (huge synthetic splits, any image folder).
            if "*" not in self.offered and spec not in self.offered:
                raise TaskError(
                    f"unknown task {spec!r} on this server; it serves "
                    f"{', '.join(self.offered)} (the operator lists them in [server] tasks "
                    "or with --tasks)"
                )
            try:
                task = get_task(spec, download=download)
            except OSError as e:  # a folder that cannot be listed or read
                raise TaskError(f"task {spec!r}: its data cannot be read ({e})") from e
            with self._lock:
                self._tasks[spec] = task
        return task

    def rows(self, req: FeatureRequest) -> tuple[TaskSplit, list[int]]:
        assert req.task is not None and req.split is not None
        split = self.task(req.task).split(req.split)
        if req.ids is None:
            rows = list(range(req.offset, len(split)))
        else:
            where = {i: n for n, i in enumerate(self.ids_labels(req, split)[0])}
            unknown = [i for i in req.ids if i not in where]
            if unknown:
                raise WireError(
                    f"{len(unknown)} ids are not in {req.task}/{req.split} (e.g. {unknown[:3]})"
                )
            rows = [where[i] for i in req.ids[req.offset :]]
        return split, rows

    def ids_labels(self, req: FeatureRequest, split: TaskSplit) -> tuple[list[str], list[int]]:
        """A split's ids and labels, listed once (tasks may build them on each access)."""
        key = (str(req.task), str(req.split))
        with self._lock:
            cached = self._columns.get(key)
        if cached is None:
            cached = (list(split.ids), list(split.labels))
            with self._lock:
                self._columns[key] = cached
        return cached

    def split_hashes(self, req: FeatureRequest, split: TaskSplit, rows: list[int]) -> list[str]:
        key = (str(req.task), str(req.split))
        with self._lock:
            cache = self._hashes.setdefault(key, [None] * len(split))
        out = []
        for r in rows:
            h = cache[r]
            if h is None:
                h = cache[r] = image_hash(_image(split, r))
            out.append(h)
        return out

    def train_images(self, task: str, limit: int) -> tuple[list[str], ImageLoader]:
        """The first ``limit`` training images of ``task`` (a projection's fit): hashes, loader."""
        # the sample task need not be offered (only its features' statistics leave the cloud),
        # so it is built here and kept apart from the offered tasks of _task
        try:
            t = self.task(task)
        except TaskError:
            if task != self.config.projection_sample:
                raise
            t = get_task(task)
        split = t.split("train")
        rows = list(range(min(limit, len(split))))
        hashes = self.split_hashes(FeatureRequest(task, "train", "final"), split, rows)
        return hashes, partial(_load_row, split, rows)

    def meta(self, req: FeatureRequest) -> tuple[WireMeta, Projection | None]:
        """The stream's metadata and, for a projected wire, the projection it applies."""
        proj = self.projections.get(req.spec, req.dtype, req.task)
        return wire_meta(self.embedder, req.spec, req.dtype, proj), proj

    def parse(self, raw: bytes, upload: bool = False) -> FeatureRequest:
        """A request from the wire, its depth and id count checked against this service."""
        req = FeatureRequest.from_json(raw, self.config.max_ticket_bytes, upload=upload)
        req.check_depth(self.backbone.num_blocks)
        if req.ids is not None and len(req.ids) > self.config.max_ids_per_ticket:
            raise WireError(
                f"{len(req.ids)} ids in one request, over the limit of {self.config.max_ids_per_ticket}"
            )
        return req

    def batches(
        self,
        req: FeatureRequest,
        split: TaskSplit,
        rows: list[int],
        meta: WireMeta,
        proj: Projection | None,
        client: str,
    ) -> Iterator[pa.RecordBatch]:
        """``rows`` of ``split`` as the wire's batches, embedded (and stored) where missing."""
        ids, labels = self.ids_labels(req, split)
        step = self.config.rows_per_batch
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            hashes = self.split_hashes(req, split, chunk)
            cols = self.embedder.columns(
                req.spec, stored_dtype(req.dtype), hashes, partial(_load_row, split, chunk)
            )
            cols = project_columns(meta, proj, cols)
            batch = assemble_batch(meta, [ids[r] for r in chunk], [labels[r] for r in chunk], cols)
            with self._lock:
                self.served.add(batch, client)
            yield batch

    def embed_uploads(
        self,
        req: FeatureRequest,
        meta: WireMeta,
        proj: Projection | None,
        ids: list[str],
        blobs: list[bytes | None],
        client: str,
    ) -> tuple[pa.RecordBatch, dict[str, str]]:
        """A device's own images as one batch of features, and the ids that did not decode."""
        errors: dict[str, str] = {}
        good_ids, images = [], []
        for i, blob in zip(ids, blobs, strict=True):
            try:
                images.append(decode_image(blob or b"", self.config.max_image_bytes))
                good_ids.append(i)
            except WireError as e:
                errors[i] = str(e)
        if errors:
            log.info("upload from %s: %d images did not decode", client, len(errors))
        cols = (
            project_columns(
                meta,
                proj,
                self.embedder.columns(
                    req.spec,
                    stored_dtype(req.dtype),
                    [image_hash(im) for im in images],
                    images.__getitem__,
                ),
            )
            if images
            else _empty_columns(feature_schema(meta))
        )
        out = assemble_batch(meta, good_ids, [None] * len(good_ids), cols)
        with self._lock:
            self.served.add(out, client)
        return out, errors

    def stats(self) -> dict[str, Any]:
        c = self.embedder.counters
        with self._lock:
            served = self.served.as_dict()
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "model_kwargs": self._model_kwargs,
            "numerics": self.backbone.numerics,
            "runtime": self.backbone.runtime,
            # whatever the task: an edge device sizes its network from this
            "geometry": {**self.backbone.geometry.to_dict(), "model_kwargs": self._model_kwargs},
            "images_embedded": c.images_embedded,
            "images_reembedded": c.images_reembedded,
            "forward_batches": c.forward_batches,
            "cache_hits": c.cache_hits,
            "cache_misses": c.cache_misses,
            "requests": dict(self.requests),
            "bytes_served": served["bytes"],
            "rows_served": served["rows"],
            "batches_served": served["batches"],
            "bytes_per_client": served["per_client"],
            "store": self.store.stats(),
            "projections": self.projections.stats(),
        }

    def warm(self, w: Warm) -> dict[str, int]:
        """Fill the store with ``w``'s pairs for its split's rows: ``w.ids``, else the first
        ``w.limit`` (else all).

        The one way to fill the store ahead of a run (a comparison's every gather and dtype, a
        fleet's devices' images): through this service's embedder, one backbone pass per image.
        """
        for spec, dtype in w.pairs:
            FeatureRequest(w.task, w.split, spec.kind, spec.k, dtype).check_depth(
                self.backbone.num_blocks
            )
        req = FeatureRequest(w.task, w.split, "final", ids=w.ids)  # names the split's hash cache
        sp, rows = self.rows(req)
        if w.ids is None and w.limit is not None:
            rows = rows[: max(w.limit, 0)]
        hashes = self.split_hashes(req, sp, rows)
        stored = list(dict.fromkeys((s, stored_dtype(d)) for s, d in w.pairs))  # one store each
        pool = None
        if self.config.warm_workers:
            from mist_fed.cloud.ray_warm import RayEmbedPool

            pool = RayEmbedPool(self.config.warm_workers, w.task, w.split, rows)
        embedded = self.embedder.warm(stored, hashes, partial(_load_row, sp, rows), pool)
        for spec, dtype in w.pairs:  # a projected wire's basis, fitted now rather than mid-run
            self.meta(FeatureRequest(w.task, w.split, spec.kind, spec.k, dtype))
        out = {"images_embedded": embedded, "rows": len(rows)}
        if pool is not None:  # forward batches each Ray node ran
            out["ray_nodes"] = len(pool.jobs_per_node)
            out["ray_jobs"] = sum(pool.jobs_per_node.values())
        return out

    def edge_init_blob(self, method: str) -> bytes:
        """The safetensors blob of ``method``'s initial edge weights (built once per method)."""
        with self._lock:
            blob = self._edge_init.get(method)
        if blob is None:
            init = edge_init.EdgeInit(
                method,
                self.backbone.name,
                self.backbone.weights_id,
                self.backbone.edge_init_state(method),  # ConfigError for an unknown method
            )
            blob = edge_init.encode(init)
            with self._lock:
                self._edge_init[method] = blob
        return blob


@dataclass(frozen=True)
class Warm:
    """A warm request: fill the store with ``pairs`` for ``task``/``split``'s rows ``ids``
    (else its first ``limit`` rows, else all of them)."""

    task: str
    split: str
    pairs: list[tuple[GatherSpec, str]]
    limit: int | None = None
    ids: tuple[str, ...] | None = None


def parse_warm(raw: bytes, max_bytes: int, max_ids: int) -> Warm:
    """A warm action's body: task, split, (spec, dtype) pairs, and a row limit or ids, checked."""
    if len(raw) > max_bytes:
        raise WireError(f"warm request is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"malformed warm request: not JSON ({e})") from e
    if not isinstance(d, dict) or not isinstance(d.get("pairs"), list) or not d["pairs"]:
        raise WireError('malformed warm request: expected {"task", "split", "pairs": [...]}')
    unknown = set(d) - {"task", "split", "pairs", "limit", "ids"}
    if unknown:
        raise WireError(f"malformed warm request: unknown keys {sorted(unknown)}")
    limit = d.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise WireError(f"warm limit must be an integer >= 0, got {limit!r}")
    ids = d.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise WireError("warm ids must be a list of strings")
    if ids is not None and len(ids) > max_ids:
        raise WireError(f"{len(ids)} ids in one warm request, over the limit of {max_ids}")
    pairs = []
    for p in d["pairs"]:
        if not isinstance(p, dict) or set(p) - {"gather", "k", "dtype"}:
            raise WireError(f"malformed warm pair {p!r}; expected {{gather, k, dtype}}")
        try:
            req = FeatureRequest(
                d.get("task"),
                d.get("split"),
                p.get("gather", "mist"),
                p.get("k"),
                p.get("dtype", "float32"),
            )
        except TypeError as e:
            raise WireError(f"malformed warm pair {p!r}: {e}") from e
        pairs.append((req.spec, req.dtype))
    task, split = d.get("task"), d.get("split")
    if not isinstance(task, str) or not isinstance(split, str):
        raise WireError("malformed warm request: 'task' and 'split' are required strings")
    return Warm(task, split, pairs, limit, None if ids is None else tuple(ids))


def _image(split: TaskSplit, row: int) -> Any:
    """Row ``row``'s image; a file that cannot be read is a :class:`TaskError` naming it."""
    try:
        return split.image(row)
    except MistError:
        raise
    except Exception as e:  # PIL and the file system raise many kinds
        raise TaskError(
            f"image {split.ids[row]!r} cannot be read ({type(e).__name__}: {e}); "
            "fix or remove the file"
        ) from e


def _load_row(split: TaskSplit, rows: list[int], i: int) -> Any:
    return _image(split, rows[i])


def _empty_columns(schema: pa.Schema) -> dict[str, pa.Array]:
    return {
        f.name: pa.ExtensionArray.from_storage(f.type, pa.array([], f.type.storage_type))
        for f in schema
        if f.name in ("features", "scale")
    }
