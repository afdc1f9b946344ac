"""``FeatureClient``: the device's side of the cloud feature service (Arrow Flight).

* ``get(task, split, gather, k, dtype, ids)`` streams a registered task's features;
* ``embed(images, gather, k, dtype)`` uploads ``(id, PNG/JPEG bytes)`` pairs and gets theirs;
* ``edge_init(method)`` downloads the pretrained weights a method's edge net starts from
  (Partial-1's last block), checked against the pinned backbone and weights.

Both return a :class:`FeatureSet` whose ``meta["wire"]`` holds the bytes, rows and batches
received (also in ``client.last``; ``client.total`` sums every call). ``on_batch(nbytes)`` is
called after each received batch (a bandwidth shaper may sleep in it). Bytes are those that
crossed the link for each batch, :func:`~mist_fed.wire.codec.batch_nbytes`: the Arrow buffers,
or for a compressed dtype (``int8ch+zstd``, ...) the compressed IPC body, measured.

Robustness: an unreachable cloud is retried with exponential backoff, then
:class:`~mist_fed.errors.CloudUnavailableError`; a stream cut midway resumes from the rows
already received (only whole batches are ever kept), as does one an unreliable ``link``
(:mod:`~mist_fed.wire.link_faults`) resets, its lost and retransmitted bytes counted; a stream whose schema metadata names
another backbone, gather, k or dtype than asked is refused with :class:`WireError`.
A feature stream has no deadline on its length (a real split over a slow link takes minutes):
it times out on a *stall*, no message for ``stall_s`` seconds, and then resumes like a cut
one. ``timeout_s`` is the deadline of the other, short calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from mist_fed.errors import CloudAuthError, CloudRequestError, CloudUnavailableError, WireError
from mist_fed.wire import edge_init as init_codec
from mist_fed.wire.codec import (
    UPLOAD_SCHEMA,
    Stats,
    WireMeta,
    batch_nbytes,
    decode,
)
from mist_fed.wire.dtypes import stored_dtype
from mist_fed.wire.features import FeatureSet
from mist_fed.wire.link_faults import FaultyLink, stall_guard
from mist_fed.wire.progress import StreamProgress, counted
from mist_fed.wire.request import FeatureRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

WARM_ACTION = "warm"  # do_action: fill the cloud's store for a split ahead of a run

#: Errors after which a call is retried (or a stream resumed).
TRANSIENT = (
    flight.FlightUnavailableError,
    flight.FlightTimedOutError,
    flight.FlightInternalError,
    flight.FlightCancelledError,
)


@dataclass
class FeatureStream:
    """One ``do_get``: its schema, what it claims to hold, and its batches as they arrive."""

    schema: pa.Schema
    meta: WireMeta
    batches: Iterator[pa.RecordBatch]


class FeatureClient:
    """A Flight client for ``mist-fed cloud serve``; see the module docstring."""

    def __init__(
        self,
        location: str,
        token: str | None = None,
        *,
        expect_backbone: str | None = None,
        expect_weights: str | None = None,
        on_batch: Callable[[int], None] | None = None,
        retries: int = 4,
        backoff_s: float = 0.25,
        timeout_s: float | None = 60.0,
        stall_s: float | None = 120.0,
        upload_batch: int = 64,
        tls_root_certs: bytes | None = None,
        progress: bool | None = None,
        link: FaultyLink | None = None,
    ) -> None:
        self.location = location
        self.link = link  # an unreliable link under feature streams (wire/link_faults.py)
        self.expect_backbone = expect_backbone
        self.expect_weights = expect_weights
        self.on_batch = on_batch
        self.retries = retries
        self.backoff_s = backoff_s
        self.upload_batch = upload_batch
        # a stream's rows ready / total and rate: None, not reported; True, a bar; False,
        # a log line every 30 s (mist_fed.wire.progress)
        self.progress = progress
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(timeout=timeout_s, headers=headers)
        self.stall_s = stall_s  # a stream with no message for this long is cut and resumed
        self._stream_options = flight.FlightCallOptions(headers=headers)  # no total deadline
        kw: dict[str, Any] = {}
        if tls_root_certs is not None:
            kw["tls_root_certs"] = tls_root_certs
        self._client = flight.FlightClient(location, **kw)
        self.last = Stats()
        self.total = Stats()

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------
    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff_s * (2**attempt))

    def _refused(self, e: flight.FlightError) -> WireError:
        msg = str(e).split(". Detail:")[0]
        if isinstance(e, flight.FlightUnauthenticatedError | flight.FlightUnauthorizedError):
            return CloudAuthError(f"cloud at {self.location} refused the token: {msg}")
        return CloudRequestError(f"cloud at {self.location} refused the request: {msg}")

    def _unavailable(self, e: Exception) -> CloudUnavailableError:
        return CloudUnavailableError(
            f"cloud at {self.location} unreachable after {self.retries + 1} tries "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check that "
            "`mist-fed cloud serve` runs there and the address and port are right"
        )

    def _check(self, schema: pa.Schema, req: FeatureRequest) -> WireMeta:
        meta = WireMeta.from_schema(schema)
        wrong = []
        if self.expect_backbone is not None and meta.backbone != self.expect_backbone:
            wrong.append(f"backbone {meta.backbone!r} (expected {self.expect_backbone!r})")
        if self.expect_weights is not None and meta.weights != self.expect_weights:
            wrong.append(f"weights {meta.weights!r} (expected {self.expect_weights!r})")
        for name in ("gather", "k", "dtype"):
            if getattr(meta, name) != getattr(req, name):
                wrong.append(f"{name} {getattr(meta, name)!r} (asked {getattr(req, name)!r})")
        if wrong:
            raise WireError(
                f"cloud at {self.location} answered {', '.join(wrong)}; refusing these features. "
                "Point the device at the cloud that serves the backbone it was set up for."
            )
        return meta

    def _account(self, stats: Stats, batch: pa.RecordBatch | None, nbytes: int) -> None:
        """``nbytes`` crossed the link, bringing ``batch`` (None: lost to a reset)."""
        if batch is None:
            stats.bytes += nbytes
            self.total.bytes += nbytes
        else:
            stats.add(batch, nbytes=nbytes)
            self.total.add(batch, nbytes=nbytes)
        if self.on_batch is not None:
            self.on_batch(nbytes)

    def _finish(self, batches: list[pa.RecordBatch], schema: pa.Schema, stats: Stats) -> FeatureSet:
        fs = decode(pa.Table.from_batches(batches, schema=schema))
        fs.meta["wire"] = {"bytes": stats.bytes, "rows": stats.rows, "batches": stats.batches}
        self.last = stats
        return fs

    # -- calls ---------------------------------------------------------------------------
    def stream(
        self,
        task: str,
        split: str,
        gather: str = "mist",
        k: int | None = None,
        dtype: str = "float32",
        ids: Sequence[str] | None = None,
    ) -> FeatureStream:
        """The stream's schema and checked metadata, and its record batches as they arrive.

        Nothing is held: each batch is handed on as it comes (``on_batch`` sees its bytes
        first). A stream cut midway resumes from the rows already received; the bytes of
        the call are in ``client.last`` once the iterator is exhausted.
        """
        req = FeatureRequest(task, split, gather, k, dtype, None if ids is None else tuple(ids))
        parts = req.parts()  # a long id list goes in several requests, in order
        stats = Stats()
        self.last = stats
        total = None
        if self.progress is not None:
            counts = [self._total(p) for p in parts]
            total = None if None in counts else sum(c or 0 for c in counts)
        reader, meta = self._open(parts[0], 0)
        batches = self._chain(parts, reader, stats)
        if self.progress is not None:
            desc = f"{task}/{split} {req.spec.label()} {dtype}"
            batches = counted(batches, StreamProgress(desc, total, bar=self.progress))
        return FeatureStream(reader.schema, meta, batches)

    def _chain(
        self, parts: list[FeatureRequest], reader: flight.FlightStreamReader, stats: Stats
    ) -> Iterator[pa.RecordBatch]:
        """The batches of each part in turn (``reader``: the first part's, open)."""
        yield from self._batches(parts[0], reader, stats)
        for part in parts[1:]:
            more, _ = self._open(part, 0)
            yield from self._batches(part, more, stats)

    def _total(self, req: FeatureRequest) -> int | None:
        """The rows a stream will send (``FlightInfo`` of its stored dtype: a projected wire's
        would wait for its basis), or None when the cloud cannot say."""
        probe = dataclasses.replace(req, dtype=stored_dtype(req.dtype))
        descriptor = flight.FlightDescriptor.for_command(probe.to_json())
        try:
            info = self._client.get_flight_info(descriptor, self._options)
        except flight.FlightError as e:
            log.debug("no row count for %s/%s: %s", req.task, req.split, e)
            return None
        return int(info.total_records) if info.total_records >= 0 else None

    def _open(self, req: FeatureRequest, offset: int) -> tuple[flight.FlightStreamReader, WireMeta]:
        """``do_get`` from row ``offset``, retried on transient errors; checks the schema."""
        ticket = flight.Ticket(dataclasses.replace(req, offset=offset).to_json())

        def call() -> tuple[flight.FlightStreamReader, WireMeta]:
            reader = self._client.do_get(ticket, self._stream_options)
            with stall_guard(reader, self.stall_s):
                schema = reader.schema
            return reader, self._check(schema, req)

        return self._retrying(call)

    def _batches(
        self, req: FeatureRequest, reader: flight.FlightStreamReader, stats: Stats
    ) -> Iterator[pa.RecordBatch]:
        attempt = 0
        received = 0
        received_at_break = 0
        while True:
            try:
                while True:
                    with stall_guard(reader, self.stall_s):
                        try:
                            chunk = reader.read_chunk()
                        except StopIteration:
                            return
                    batch = chunk.data  # a chunk is a whole batch, never a partial one
                    nbytes = batch_nbytes(batch, req.dtype)  # compressed: its IPC body
                    if self.link is not None:
                        carried = self.link.carry(nbytes)
                        if carried.reset:  # the real stream is dropped and resumed
                            self._account(stats, None, carried.wire_bytes)
                            reader.cancel()
                            raise flight.FlightUnavailableError(f"link: {carried.why}")
                        nbytes = carried.wire_bytes  # with retransmitted segments
                    received += batch.num_rows
                    self._account(stats, batch, nbytes)
                    yield batch
            except TRANSIENT as e:
                if received > received_at_break:
                    attempt = 0  # the stream made progress since its last break: a fresh budget
                received_at_break = received
                if attempt >= self.retries:
                    raise self._unavailable(e) from e
                log.warning(
                    "stream from %s broke after %d rows (%s: %s); resuming",
                    self.location,
                    received,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                self._sleep(attempt)
                attempt += 1
                reader, _ = self._open(req, received)
            except flight.FlightError as e:
                raise self._refused(e) from e

    def get(
        self,
        task: str,
        split: str,
        gather: str = "mist",
        k: int | None = None,
        dtype: str = "float32",
        ids: Sequence[str] | None = None,
    ) -> FeatureSet:
        """The features of ``task``/``split`` (or just ``ids``), decoded in memory.

        For small requests (a fleet device's few images, tests); a device that trains on a
        split streams it into its cache (:meth:`stream`) instead of holding it.
        """
        s = self.stream(task, split, gather, k, dtype, ids)
        got = list(s.batches)
        return self._finish(got, s.schema, self.last)

    def embed(
        self,
        images: Sequence[tuple[str, bytes]],
        gather: str = "mist",
        k: int | None = None,
        dtype: str = "float32",
    ) -> FeatureSet:
        """Upload ``(id, encoded image)`` pairs and receive their features.

        Images that the cloud could not decode are left out of the result and listed in
        ``meta["errors"]`` (``{id: reason}``).
        """
        req = FeatureRequest(None, None, gather, k, dtype)
        return self._retrying(lambda: self._embed_once(req, images))

    def _retrying(self, call: Callable[[], T]) -> T:
        """``call()``, retried on transient errors with backoff; refusals raised as they come."""
        attempt = 0
        while True:
            try:
                return call()
            except TRANSIENT as e:
                if attempt >= self.retries:
                    raise self._unavailable(e) from e
                self._sleep(attempt)
                attempt += 1
            except flight.FlightError as e:
                raise self._refused(e) from e

    def _embed_once(self, req: FeatureRequest, images: Sequence[tuple[str, bytes]]) -> FeatureSet:
        descriptor = flight.FlightDescriptor.for_command(req.to_json())
        writer, reader = self._client.do_exchange(descriptor, self._stream_options)
        stats = Stats()
        batches: list[pa.RecordBatch] = []
        errors: dict[str, str] = {}
        with writer:
            writer.begin(UPLOAD_SCHEMA)
            with stall_guard(reader, self.stall_s):
                schema = reader.schema
            self._check(schema, req)
            for start in range(0, len(images), self.upload_batch):
                part = images[start : start + self.upload_batch]
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.array([i for i, _ in part]),
                            pa.array([b for _, b in part], pa.binary()),
                        ],
                        schema=UPLOAD_SCHEMA,
                    )
                )
                with stall_guard(reader, self.stall_s):
                    chunk = reader.read_chunk()
                if chunk.app_metadata is not None:
                    errors.update(json.loads(chunk.app_metadata.to_pybytes()).get("errors", {}))
                batches.append(chunk.data)
                self._account(stats, chunk.data, batch_nbytes(chunk.data, req.dtype))
            writer.done_writing()
        fs = self._finish(batches, schema, stats)
        fs.meta["errors"] = errors
        return fs

    def stats(self) -> dict[str, Any]:
        """The server's counters (``do_action("stats")``)."""
        try:
            results = list(self._client.do_action(flight.Action("stats", b""), self._options))
        except TRANSIENT as e:
            raise self._unavailable(e) from e
        except flight.FlightError as e:
            raise self._refused(e) from e
        return dict(json.loads(results[0].body.to_pybytes()))

    def warm(
        self,
        task: str,
        split: str,
        pairs: Sequence[tuple[str, int | None, str]],
        limit: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> dict[str, int]:
        """Have the cloud store ``(gather, k, dtype)`` pairs for a split's rows ``ids``, else
        its first ``limit`` rows (else all).

        One backbone pass per image on the cloud; no features come back. No deadline (a big
        split takes minutes); refusals and unreachable clouds raise as for :meth:`get`.
        """
        body: dict[str, Any] = {
            "task": task,
            "split": split,
            "pairs": [{"gather": g, "k": k, "dtype": d} for g, k, d in pairs],
        }
        if limit is not None:
            body["limit"] = limit
        if ids is not None:
            body["ids"] = list(ids)
        action = flight.Action(WARM_ACTION, json.dumps(body).encode())
        results = self._retrying(lambda: list(self._client.do_action(action, self._stream_options)))
        return dict(json.loads(results[0].body.to_pybytes()))

    def edge_init(self, method: str) -> init_codec.EdgeInit:
        """The pretrained weights ``method``'s edge net starts from (``do_action("edge_init")``).

        Retried like the other calls; refused with :class:`WireError` if they come from another
        backbone or weights than the client expects. ``on_batch`` sees their bytes (one blob).
        """
        action = flight.Action(init_codec.ACTION, init_codec.encode_request(method))
        results = self._retrying(lambda: list(self._client.do_action(action, self._options)))
        if len(results) != 1:
            raise WireError(
                f"cloud at {self.location} answered edge_init with {len(results)} parts"
            )
        init = init_codec.decode(results[0].body.to_pybytes())
        if self.on_batch is not None:
            self.on_batch(init.nbytes)
        wrong = []
        if init.method != method:
            wrong.append(f"method {init.method!r} (asked {method!r})")
        if self.expect_backbone is not None and init.backbone != self.expect_backbone:
            wrong.append(f"backbone {init.backbone!r} (expected {self.expect_backbone!r})")
        if self.expect_weights is not None and init.weights != self.expect_weights:
            wrong.append(f"weights {init.weights!r} (expected {self.expect_weights!r})")
        if wrong:
            raise WireError(
                f"cloud at {self.location} sent edge weights of {', '.join(wrong)}; refusing them. "
                "Point the device at the cloud that serves the backbone it was set up for."
            )
        return init

    def list_sets(self) -> list[dict[str, Any]]:
        """The feature sets on offer: request fields, rows and bytes of each."""
        out = []
        try:
            for info in self._client.list_flights(b"", self._options):
                d = json.loads(info.descriptor.command)
                d.update(rows=info.total_records, bytes=info.total_bytes)
                out.append(d)
        except flight.FlightError as e:
            raise self._refused(e) from e
        return out
