"""The Arrow Flight feature server behind ``mist-fed cloud serve``: a thin adapter that turns
Flight calls into :class:`~mist_fed.cloud.service.FeatureService` calls (tickets, auth, TLS,
Flight errors).

* ``do_get`` with a JSON :class:`~mist_fed.wire.request.FeatureRequest` ticket streams the
  features of a registered task's split (all rows, an ``ids`` subset, or from ``offset``).
* ``do_exchange`` takes a device's own images (:data:`~mist_fed.wire.codec.UPLOAD_SCHEMA`)
  batch by batch and answers each with its features; images that do not decode are reported
  per id in the reply's app metadata (``{"errors": {id: message}}``), the rest are served.
* ``list_flights`` / ``get_flight_info`` describe the feature sets on offer;
  ``do_action("stats")`` returns the counters as JSON.
* ``do_action("warm")`` with ``{"task", "split", "pairs": [{"gather", "k", "dtype"}, ...],
  "limit"?}`` fills the store for a split's first ``limit`` rows (all by default), every pair
  from one backbone pass per image (:meth:`FeatureService.warm`); it answers
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
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from mist_fed.cloud.auth import (
    MIDDLEWARE_KEY,
    BearerAuthFactory,
    Principal,
    TokenTable,
    principal_of,
)
from mist_fed.cloud.backbone import Backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.service import FeatureService, parse_warm
from mist_fed.data.tasks import TaskSplit
from mist_fed.errors import MistError, WireError
from mist_fed.wire import edge_init
from mist_fed.wire.codec import UPLOAD_SCHEMA, WireMeta, feature_schema, ipc_options
from mist_fed.wire.dtypes import feature_bytes, is_fixed_size
from mist_fed.wire.flight import WARM_ACTION
from mist_fed.wire.projection import Projection
from mist_fed.wire.request import FeatureRequest

log = logging.getLogger(__name__)


def _bad(e: Exception) -> flight.FlightServerError:
    return flight.FlightServerError(f"bad request: {e}")


class FeatureServer(flight.FlightServerBase):
    """Serves a :class:`FeatureService`'s features over Arrow Flight."""

    def __init__(self, config: ServeConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.service = FeatureService(config, backbone)
        self._unlisted: set[str] = set()  # offered tasks whose data was not here (logged once)
        middleware = {}
        if config.tokens is not None:
            middleware[MIDDLEWARE_KEY] = BearerAuthFactory(TokenTable.from_toml(config.tokens))
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            with open(config.tls_cert, "rb") as c, open(config.tls_key, "rb") as k:
                tls = [(c.read(), k.read())]
        super().__init__(config.location, tls_certificates=tls, middleware=middleware or None)
        backbone_ = self.service.backbone
        log.info(
            "feature server on %s:%d (backbone %s, %s; %s; store %s, auth %s)",
            config.host,
            self.port,
            backbone_.name,
            backbone_.weights_id,
            self.service.numerics_why,
            self.service.store.root,
            "tokens" if config.tokens else "open",
        )

    # -- helpers (tests override _parse and _stream to inject faults) ---------------------
    def _client(self, context: Any, principal: Principal) -> str:
        return principal.name if principal.name != "open" else str(context.peer())

    def _parse(self, raw: bytes, upload: bool = False) -> FeatureRequest:
        return self.service.parse(raw, upload)

    def _check_scope(self, context: Any, req: FeatureRequest) -> Principal:
        principal = principal_of(context)
        if req.task is not None:
            principal.check(req.task)
        return principal

    def _info(self, req: FeatureRequest) -> flight.FlightInfo:
        _, rows = self.service.rows(req)
        meta, _ = self.service.meta(req)
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

    def _refused(self, e: MistError) -> flight.FlightServerError:
        self.service.requests["refused"] += 1
        log.info("refused request: %s", e)
        return _bad(e)

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError):
            self.service.requests["refused"] += 1
            raise
        except MistError as e:
            raise self._refused(e) from e

    # -- Flight methods ------------------------------------------------------------------
    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        principal = principal_of(context)
        n = self.service.backbone.num_blocks
        for spec in self.service.offered:
            if spec == "*" or not principal.allows(spec):
                continue
            try:
                self.service.task(spec, download=False)  # listing never downloads a dataset
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
            split, rows = self.service.rows(req)
            self.service.requests["do_get"] += 1
            meta, proj = self.service.meta(req)
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
        try:
            yield from self.service.batches(req, split, rows, meta, proj, client)
        except MistError as e:
            raise self._refused(e) from e

    def do_exchange(
        self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any
    ) -> None:
        def setup() -> FeatureRequest:
            return self._parse(descriptor.command or b"{}", upload=True)

        req = self._guard(setup)
        client = self._client(context, principal_of(context))
        self.service.requests["do_exchange"] += 1
        meta, proj = self._guard(self.service.meta, req)
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
            try:
                out, errors = self.service.embed_uploads(req, meta, proj, ids, blobs, client)
            except MistError as e:
                raise _bad(e) from e
            writer.write_with_metadata(out, pa.py_buffer(json.dumps({"errors": errors}).encode()))

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            ("stats", "server counters as JSON"),
            ("health", "ok and the backbone"),
            (WARM_ACTION, "fill the store for a split: body {task, split, pairs, limit? | ids?}"),
            (
                edge_init.ACTION,
                'a method\'s initial edge weights (safetensors); body {"method": NAME}',
            ),
        ]

    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        service = self.service
        if action.type == "stats":
            return iter([json.dumps(service.stats()).encode()])
        if action.type == "health":
            return iter([json.dumps({"ok": True, "weights": service.backbone.weights_id}).encode()])
        if action.type == WARM_ACTION:

            def warm() -> bytes:
                w = parse_warm(
                    action.body.to_pybytes(),
                    self.config.max_ticket_bytes,
                    self.config.max_ids_per_ticket,
                )
                principal_of(context).check(w.task)
                return json.dumps(service.warm(w)).encode()

            return iter([self._guard(warm)])
        if action.type == edge_init.ACTION:

            def run() -> bytes:
                method = edge_init.decode_request(action.body.to_pybytes())
                blob = service.edge_init_blob(method)
                service.requests["edge_init"] += 1
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
