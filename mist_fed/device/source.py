"""Where a device's features come from: the cloud's Flight service, or a fake in tests.

A :class:`FeatureSource` describes the cloud backbone (:class:`~mist_fed.core.specs.Geometry`,
whatever the task), streams a split's feature batches, serves a method's initial edge weights
and embeds a device's own images. :class:`FlightSource` is the real one, over
:class:`~mist_fed.wire.flight.FeatureClient`: it pins the backbone and weights on first
contact, so every later stream must come from the same ones, and passes every received batch
through the device's link shaper (which may sleep to pace it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

import pyarrow as pa

from mist_fed.core.specs import GatherSpec, Geometry
from mist_fed.wire.edge_init import EdgeInit
from mist_fed.wire.features import FeatureSet
from mist_fed.wire.flight import FeatureClient
from mist_fed.wire.shaping import LinkShaper

log = logging.getLogger(__name__)


class FeatureSource(Protocol):
    """What an :class:`~mist_fed.device.edge.EdgeDevice` asks of the cloud."""

    def geometry(self) -> Geometry: ...

    def stream(
        self,
        task: str,
        split: str,
        spec: GatherSpec,
        dtype: str,
        ids: Sequence[str] | None = None,
    ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]: ...

    def edge_init(self, method: str) -> EdgeInit: ...

    def embed(
        self, images: Sequence[tuple[str, bytes]], spec: GatherSpec, dtype: str
    ) -> FeatureSet: ...

    @property
    def bytes_received(self) -> int: ...


class FlightSource:
    """A :class:`FeatureSource` over a running ``mist-fed cloud serve``."""

    def __init__(
        self,
        location: str,
        token: str | None = None,
        shaper: LinkShaper | None = None,
        *,
        retries: int = 4,
        backoff_s: float = 0.25,
        expect_backbone: str | None = None,
        expect_weights: str | None = None,
        progress: bool | None = None,
    ) -> None:
        self.shaper = shaper
        self._bytes = 0
        self.client = FeatureClient(
            location,
            token,
            on_batch=self._on_batch,
            retries=retries,
            backoff_s=backoff_s,
            expect_backbone=expect_backbone,
            expect_weights=expect_weights,
            progress=progress,
        )
        self._geometry: Geometry | None = None

    def _on_batch(self, nbytes: int) -> None:
        self._bytes += nbytes
        if self.shaper is not None:
            self.shaper.on_batch(nbytes)

    def _request(self) -> None:
        if self.shaper is not None:
            self.shaper.on_request()

    @property
    def bytes_received(self) -> int:
        """Every byte that came over the link through this source (features and weights)."""
        return self._bytes

    def geometry(self) -> Geometry:
        if self._geometry is None:
            stats = self.client.stats()  # CloudUnavailableError after retries with backoff
            self._geometry = Geometry.from_dict(stats.get("geometry") or {})
            # Pin the backbone: every later stream must come from the same backbone and weights.
            self.client.expect_backbone = self._geometry.backbone
            self.client.expect_weights = self._geometry.weights
        return self._geometry

    def stream(
        self,
        task: str,
        split: str,
        spec: GatherSpec,
        dtype: str,
        ids: Sequence[str] | None = None,
    ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        self.geometry()
        self._request()
        s = self.client.stream(task, split, spec.kind, spec.k, dtype, ids)
        return s.schema, s.batches

    def edge_init(self, method: str) -> EdgeInit:
        self.geometry()
        self._request()
        return self.client.edge_init(method)  # its bytes pass _on_batch

    def embed(
        self, images: Sequence[tuple[str, bytes]], spec: GatherSpec, dtype: str
    ) -> FeatureSet:
        self.geometry()
        self._request()
        return self.client.embed(images, spec.kind, spec.k, dtype)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> FlightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
