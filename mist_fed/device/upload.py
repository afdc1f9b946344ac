"""A device's own images as features: uploaded to the cloud a chunk at a time (``do_exchange``),
the replies encoded as the wire's record batches, ready for the device's cache."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa

from mist_fed.core.specs import GatherSpec, Geometry
from mist_fed.device.clock import DeviceClock
from mist_fed.device.source import FeatureSource
from mist_fed.errors import ConfigError, WireError
from mist_fed.wire.codec import WireMeta, encode, feature_schema
from mist_fed.wire.dtypes import parse_wire, wire_shape
from mist_fed.wire.features import FeatureSet

log = logging.getLogger(__name__)


def upload_split(
    source: FeatureSource,
    clock: DeviceClock,
    g: Geometry,
    images: list[tuple[str, bytes, int]],
    split: str,
    spec: GatherSpec,
    dtype: str,
    chunk: int = 64,
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The device's own images of ``split``, uploaded ``chunk`` at a time, as feature batches."""
    try:
        shape = wire_shape(g.shape(spec), dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    meta = WireMeta(g.backbone, g.weights, spec.kind, spec.k, dtype, shape)
    parts = [images[s : s + chunk] for s in range(0, len(images), chunk)]

    def upload(part: list[tuple[str, bytes, int]]) -> tuple[FeatureSet, dict[str, int]]:
        clock.add_upload(sum(len(b) for _, b, _ in part))
        fs = source.embed([(i, b) for i, b, _ in part], spec, dtype)
        for i, reason in fs.meta.get("errors", {}).items():
            log.warning("the cloud could not read image %s: %s", i, reason)
        return fs, {i: y for i, _, y in part}

    # a projected wire's schema names the basis: the cloud's first reply says which
    first = upload(parts[0]) if parts and parse_wire(dtype).projected else None
    if first is not None:
        meta = WireMeta.from_dict({**first[0].meta, "dtype": dtype})

    def batches() -> Iterator[pa.RecordBatch]:
        for n, part in enumerate(parts):
            fs, label = first if (n == 0 and first is not None) else upload(part)
            if fs.meta.get("basis", "") != meta.basis:
                raise WireError(f"the cloud changed its projection during an upload of {split}")
            yield encode(meta, fs.ids, [label[i] for i in fs.ids], fs.features)

    return feature_schema(meta), batches()
