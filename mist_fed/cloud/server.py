"""The Arrow Flight feature server behind ``mist-fed cloud serve``.

* ``do_get`` with a JSON :class:`~mist_fed.wire.request.FeatureRequest` ticket streams the
  features of a registered task's split (all rows, an ``ids`` subset, or from ``offset``).
* ``do_exchange`` takes a device's own images (:data:`~mist_fed.wire.codec.UPLOAD_SCHEMA`)
  batch by batch and answers each with its features; images that do not decode are reported
  per id in the reply's app metadata (``{"errors": {id: message}}``), the rest are served.
* ``list_flights`` / ``get_flight_info`` describe the feature sets on offer;
  ``do_action("stats")`` returns the counters as JSON.
* ``do_action("warm")`` with ``{"task", "split", "pairs": [{"gather", "k", "dtype"}, ...],
  "limit"?}`` fills the store for a split's first ``limit`` rows (all by default), every pair
  from one backbone pass per image (:meth:`FeatureServer.warm`); it answers
  ``{"images_embedded", "rows"}``. Scoped to the task like ``do_get``.
* ``do_action("edge_init")`` with ``{"method": NAME}`` returns the pretrained backbone weights
  that method's edge net starts from (Partial-1: the last block and final norm) as one
  safetensors blob (:mod:`mist_fed.wire.edge_init`). Like ``stats``, any authenticated token
  may ask: these are backbone weights, not a task's data, so task scopes do not apply.

Bad requests fail with a ``FlightServerError`` naming the problem; they never stop the server.

A compressed wire dtype (``float16+zstd``, ``int4ch+lz4``, ...) is served from its base dtype's
store partition (compression is the link's business, not the store's) and streamed with Arrow
IPC buffer compression (:func:`~mist_fed.wire.codec.ipc_options`); its ``FlightInfo`` says
``total_bytes = -1`` (unknown: the compressed size depends on the data). The ``served``
counters count the Arrow bytes before compression.

A projected wire (``pca192-int4ch``, ``pca64task-int8ch+zstd``) is served from the gather's
``float16`` partition: each batch is projected on the basis :mod:`mist_fed.cloud.projections`
fitted once (the stream's metadata names its id) and encoded in the wire's dtype.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from mist_fed.assets.defaults import OFFLINE_BACKBONE, PAPER_BACKBONE, choose_backbone
from mist_fed.cloud.auth import (
    MIDDLEWARE_KEY,
    BearerAuthFactory,
    Principal,
    TokenTable,
    principal_of,
)
from mist_fed.cloud.backbone import Backbone, create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.embed import Embedder, ImageLoader, decode_image, image_hash
from mist_fed.cloud.projections import Projections, project_columns, wire_meta
from mist_fed.cloud.store import FeatureStore
from mist_fed.core.specs import GatherSpec
from mist_fed.data import get_task
from mist_fed.data.registry import Task, TaskSplit
from mist_fed.errors import MistError, TaskError, WireError
from mist_fed.wire import edge_init
from mist_fed.wire.client import WARM_ACTION
from mist_fed.wire.codec import (
    UPLOAD_SCHEMA,
    Stats,
    WireMeta,
    assemble_batch,
    feature_schema,
    ipc_options,
)
from mist_fed.wire.dtypes import feature_bytes, is_fixed_size, stored_dtype
from mist_fed.wire.projection import Projection
from mist_fed.wire.request import FeatureRequest

log = logging.getLogger(__name__)


def _bad(e: Exception) -> flight.FlightServerError:
    return flight.FlightServerError(f"bad request: {e}")


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


class FeatureServer(flight.FlightServerBase):
    """Serves Gather* (and baseline) features of a frozen backbone over Arrow Flight."""

    def __init__(self, config: ServeConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.offered = config.offered_tasks()
        self._unlisted: set[str] = set()  # offered tasks whose data was not here (logged once)
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
            self._train_images,
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
        middleware = {}
        if config.tokens is not None:
            middleware[MIDDLEWARE_KEY] = BearerAuthFactory(TokenTable.from_toml(config.tokens))
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            with open(config.tls_cert, "rb") as c, open(config.tls_key, "rb") as k:
                tls = [(c.read(), k.read())]
        super().__init__(config.location, tls_certificates=tls, middleware=middleware or None)
        log.info(
            "feature server on %s:%d (backbone %s, %s; %s; store %s, auth %s)",
            config.host,
            self.port,
            self.backbone.name,
            self.backbone.weights_id,
            self.numerics_why,
            self.store.root,
            "tokens" if config.tokens else "open",
        )

    # -- helpers -------------------------------------------------------------------------
    def _client(self, context: Any, principal: Principal) -> str:
        return principal.name if principal.name != "open" else str(context.peer())

    def _task(self, spec: str, download: bool = True) -> Task:
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

    def _parse(self, raw: bytes, upload: bool = False) -> FeatureRequest:
        req = FeatureRequest.from_json(raw, self.config.max_ticket_bytes, upload=upload)
        req.check_depth(self.backbone.num_blocks)
        if req.ids is not None and len(req.ids) > self.config.max_ids_per_ticket:
            raise WireError(
                f"{len(req.ids)} ids in one request, over the limit of {self.config.max_ids_per_ticket}"
            )
        return req

    def _rows(self, req: FeatureRequest) -> tuple[TaskSplit, list[int]]:
        assert req.task is not None and req.split is not None
        split = self._task(req.task).split(req.split)
        if req.ids is None:
            rows = list(range(req.offset, len(split)))
        else:
            where = {i: n for n, i in enumerate(self._ids_labels(req, split)[0])}
            unknown = [i for i in req.ids if i not in where]
            if unknown:
                raise WireError(
                    f"{len(unknown)} ids are not in {req.task}/{req.split} (e.g. {unknown[:3]})"
                )
            rows = [where[i] for i in req.ids[req.offset :]]
        return split, rows

    def _ids_labels(self, req: FeatureRequest, split: TaskSplit) -> tuple[list[str], list[int]]:
        """A split's ids and labels, listed once (tasks may build them on each access)."""
        key = (str(req.task), str(req.split))
        with self._lock:
            cached = self._columns.get(key)
        if cached is None:
            cached = (list(split.ids), list(split.labels))
            with self._lock:
                self._columns[key] = cached
        return cached

    def _split_hashes(self, req: FeatureRequest, split: TaskSplit, rows: list[int]) -> list[str]:
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

    def _train_images(self, task: str, limit: int) -> tuple[list[str], ImageLoader]:
        """The first ``limit`` training images of ``task`` (a projection's fit): hashes, loader."""
        # the sample task need not be offered (only its features' statistics leave the cloud),
        # so it is built here and kept apart from the offered tasks of _task
        try:
            t = self._task(task)
        except TaskError:
            if task != self.config.projection_sample:
                raise
            t = get_task(task)
        split = t.split("train")
        rows = list(range(min(limit, len(split))))
        hashes = self._split_hashes(FeatureRequest(task, "train", "final"), split, rows)
        return hashes, partial(_load_row, split, rows)

    def _meta(self, req: FeatureRequest) -> tuple[WireMeta, Projection | None]:
        """The stream's metadata and, for a projected wire, the projection it applies."""
        proj = self.projections.get(req.spec, req.dtype, req.task)
        return wire_meta(self.embedder, req.spec, req.dtype, proj), proj

    def _check_scope(self, context: Any, req: FeatureRequest) -> Principal:
        principal = principal_of(context)
        if req.task is not None:
            principal.check(req.task)
        return principal

    def _info(self, req: FeatureRequest) -> flight.FlightInfo:
        _, rows = self._rows(req)
        meta, _ = self._meta(req)
        schema = feature_schema(meta)
        fixed = is_fixed_size(req.dtype)
        per_row = feature_bytes(meta.shape, req.dtype) if fixed else 0
        ticket = flight.Ticket(req.to_json())
        return flight.FlightInfo(
            schema,
            flight.FlightDescriptor.for_command(req.to_json()),
            [flight.FlightEndpoint(ticket, [])],
            total_records=len(rows),
            total_bytes=len(rows) * per_row if fixed else -1,
        )

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError):
            self.requests["refused"] += 1
            raise
        except MistError as e:
            self.requests["refused"] += 1
            log.info("refused request: %s", e)
            raise _bad(e) from e

    # -- Flight methods ------------------------------------------------------------------
    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        principal = principal_of(context)
        n = self.backbone.num_blocks
        for spec in self.offered:
            if spec == "*" or not principal.allows(spec):
                continue
            try:
                self._task(spec, download=False)  # listing never downloads a dataset
            except MistError as e:
                if spec not in self._unlisted:
                    self._unlisted.add(spec)
                    log.info("task %s is offered but its data is not here: %s", spec, e)
                continue
            for split in ("train", "val", "test"):
                req = FeatureRequest(spec, split, "mist", n, self.config.default_dtype)
                try:
                    yield self._info(req)
                except MistError as e:
                    log.warning("task %s/%s is not on offer: %s", spec, split, e)
                    break

    def get_flight_info(
        self, context: Any, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        def run() -> flight.FlightInfo:
            req = self._parse(descriptor.command or b"")
            self._check_scope(context, req)
            return self._info(req)

        return self._guard(run)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        def run() -> flight.FlightDataStream:
            req = self._parse(ticket.ticket)
            principal = self._check_scope(context, req)
            split, rows = self._rows(req)
            self.requests["do_get"] += 1
            meta, proj = self._meta(req)
            return flight.GeneratorStream(
                feature_schema(meta),
                self._stream(context, principal, req, split, rows, meta, proj),
                options=ipc_options(req.dtype),
            )

        return self._guard(run)

    def _stream(
        self,
        context: Any,
        principal: Principal,
        req: FeatureRequest,
        split: TaskSplit,
        rows: list[int],
        meta: WireMeta,
        proj: Projection | None,
    ) -> Iterator[pa.RecordBatch]:
        client = self._client(context, principal)
        ids, labels = self._ids_labels(req, split)
        step = self.config.rows_per_batch
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            try:
                hashes = self._split_hashes(req, split, chunk)
                cols = self.embedder.columns(
                    req.spec, stored_dtype(req.dtype), hashes, partial(_load_row, split, chunk)
                )
                cols = project_columns(meta, proj, cols)
            except MistError as e:
                self.requests["refused"] += 1
                log.info("refused request mid-stream: %s", e)
                raise _bad(e) from e
            batch = assemble_batch(meta, [ids[r] for r in chunk], [labels[r] for r in chunk], cols)
            with self._lock:
                self.served.add(batch, client)
            yield batch

    def do_exchange(
        self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any
    ) -> None:
        def setup() -> FeatureRequest:
            return self._parse(descriptor.command or b"{}", upload=True)

        req = self._guard(setup)
        principal = principal_of(context)
        client = self._client(context, principal)
        self.requests["do_exchange"] += 1
        meta, proj = self._guard(self._meta, req)
        writer.begin(feature_schema(meta), options=ipc_options(req.dtype))
        seen = 0
        for chunk in reader:
            batch = chunk.data
            if batch is None:
                continue
            if not batch.schema.equals(UPLOAD_SCHEMA, check_metadata=False):
                raise _bad(WireError(f"upload schema must be {UPLOAD_SCHEMA}, got {batch.schema}"))
            seen += batch.num_rows
            if seen > self.config.max_upload_images:
                raise _bad(
                    WireError(f"more than {self.config.max_upload_images} images in one upload")
                )
            ids = batch.column("id").to_pylist()
            blobs = batch.column("image").to_pylist()
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
            try:
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
            except MistError as e:
                raise _bad(e) from e
            out = assemble_batch(meta, good_ids, [None] * len(good_ids), cols)
            with self._lock:
                self.served.add(out, client)
            writer.write_with_metadata(out, pa.py_buffer(json.dumps({"errors": errors}).encode()))

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

    def warm(
        self,
        task: str,
        split: str,
        pairs: list[tuple[GatherSpec, str]],
        limit: int | None = None,
    ) -> dict[str, int]:
        """Fill the store with ``pairs`` for ``task``/``split``'s first ``limit`` rows (or all).

        The one way to fill the store ahead of a run (a comparison's every gather and dtype):
        through this service's embedder, one backbone pass per image.
        """
        for spec, dtype in pairs:
            FeatureRequest(task, split, spec.kind, spec.k, dtype).check_depth(
                self.backbone.num_blocks
            )
        sp = self._task(task).split(split)
        n = len(sp) if limit is None else min(max(limit, 0), len(sp))
        rows = list(range(n))
        req = FeatureRequest(task, split, "final")  # names the split for the hash cache
        hashes = self._split_hashes(req, sp, rows)
        stored = list(dict.fromkeys((s, stored_dtype(d)) for s, d in pairs))  # one store each
        embedded = self.embedder.warm(stored, hashes, partial(_load_row, sp, rows))
        for spec, dtype in pairs:  # a projected wire's basis, fitted now rather than mid-run
            self._meta(FeatureRequest(task, split, spec.kind, spec.k, dtype))
        return {"images_embedded": embedded, "rows": n}

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

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            ("stats", "server counters as JSON"),
            ("health", "ok and the backbone"),
            (WARM_ACTION, "fill the store for a split: body {task, split, pairs, limit?}"),
            (
                edge_init.ACTION,
                'a method\'s initial edge weights (safetensors); body {"method": NAME}',
            ),
        ]

    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        if action.type == "stats":
            return iter([json.dumps(self.stats()).encode()])
        if action.type == "health":
            return iter([json.dumps({"ok": True, "weights": self.backbone.weights_id}).encode()])
        if action.type == WARM_ACTION:

            def warm() -> bytes:
                task, split, pairs, limit = _parse_warm(
                    action.body.to_pybytes(), self.config.max_ticket_bytes
                )
                principal_of(context).check(task)
                return json.dumps(self.warm(task, split, pairs, limit)).encode()

            return iter([self._guard(warm)])
        if action.type == edge_init.ACTION:

            def run() -> bytes:
                method = edge_init.decode_request(action.body.to_pybytes())
                blob = self.edge_init_blob(method)
                self.requests["edge_init"] += 1
                log.info(
                    "edge_init %s for %s: %d bytes",
                    method,
                    self._client(context, principal_of(context)),
                    len(blob),
                )
                return blob

            return iter([self._guard(run)])
        raise flight.FlightServerError(
            f"unknown action {action.type!r}; available: stats, health, {WARM_ACTION}, "
            f"{edge_init.ACTION}"
        )


def _parse_warm(
    raw: bytes, max_bytes: int
) -> tuple[str, str, list[tuple[GatherSpec, str]], int | None]:
    """A warm action's body: task, split, (spec, dtype) pairs and row limit, each checked."""
    if len(raw) > max_bytes:
        raise WireError(f"warm request is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"malformed warm request: not JSON ({e})") from e
    if not isinstance(d, dict) or not isinstance(d.get("pairs"), list) or not d["pairs"]:
        raise WireError('malformed warm request: expected {"task", "split", "pairs": [...]}')
    unknown = set(d) - {"task", "split", "pairs", "limit"}
    if unknown:
        raise WireError(f"malformed warm request: unknown keys {sorted(unknown)}")
    limit = d.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise WireError(f"warm limit must be an integer >= 0, got {limit!r}")
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
    return task, split, pairs, limit


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
