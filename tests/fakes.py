"""An in-memory feature source: EdgeDevice tests without a server, a backbone or Ray.

``MemorySource`` serves synthetic features of a made-up backbone geometry for any task and
split: row ``i`` of a split has id ``"{split}-{i}"``, label ``i % classes``, and features whose
class-token row carries the label (so a net can learn it) plus seeded noise; ``k`` scales the
signal, so a deeper gather is easier. Every batch it streams is counted in ``bytes_received``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from mist_fed.core.specs import GatherSpec, Geometry
from mist_fed.wire.codec import WireMeta, batch_nbytes, encode, feature_schema
from mist_fed.wire.edge_init import EdgeInit
from mist_fed.wire.features import FeatureSet

# A device profile with 1 MB of memory: any edge job exceeds it.
TINY_DEVICE = """\
name = "tiny-mem"
cores = 1
memory_mb = 1
downlink_mbps = 10.0
uplink_mbps = 5.0
latency_ms = 10.0
gflops = 1.0
[sources]
cores = "test"
memory_mb = "test: far below any edge net's working set"
downlink_mbps = "test"
uplink_mbps = "test"
latency_ms = "test"
gflops = "test"
"""


GEOMETRY = Geometry(
    backbone="fake-vit",
    weights="fake:0",
    num_blocks=3,
    embed_dim=16,
    num_tokens=5,
    num_prefix_tokens=1,
    img_size=32,
    num_heads=2,
)


class MemorySource:
    def __init__(
        self,
        rows: dict[str, int] | None = None,
        classes: int = 3,
        geometry: Geometry = GEOMETRY,
        batch_rows: int = 8,
        init: dict | None = None,
        seed: int = 0,
        grouped: bool = False,
    ) -> None:
        self.grouped = grouped  # a split's rows class by class (as image folders list them)
        self.seed = seed  # the same features in every process (no str hash: it varies per run)
        self.rows = rows or {"train": 48, "val": 24, "test": 30}
        self.classes = classes
        self.g = geometry
        self.batch_rows = batch_rows
        self.init = init or {}
        self.bytes_received = 0
        self.streams: list[tuple[str, str, GatherSpec, str]] = []  # what was asked, in order
        self.break_after: int | None = None  # raise after this many batches of the next stream

    def geometry(self) -> Geometry:
        return self.g

    def meta(self, spec: GatherSpec, dtype: str) -> WireMeta:
        return WireMeta(
            self.g.backbone, self.g.weights, spec.kind, spec.k, dtype, self.g.shape(spec)
        )

    def features(self, split: str, spec: GatherSpec, rows: Sequence[int]) -> np.ndarray:
        shape = self.g.shape(spec)
        rng = np.random.default_rng([zlib.crc32(split.encode()), self.seed, *rows[:1]])
        x = rng.normal(size=(len(rows), *shape)).astype(np.float32)
        strength = 1.0 + (spec.k or self.g.num_blocks)
        for j, i in enumerate(rows):
            flat = x[j].reshape(-1, shape[-1])
            flat[0, self.label(split, i)] += strength
        return x

    def label(self, split: str, i: int) -> int:
        """Row ``i``'s class: interleaved, or in blocks of equal size when ``grouped``."""
        if self.grouped:
            return i * self.classes // self.rows[split]
        return i % self.classes

    def stream(
        self,
        task: str,
        split: str,
        spec: GatherSpec,
        dtype: str,
        ids: Sequence[str] | None = None,
    ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        self.streams.append((task, split, spec, dtype))
        meta = self.meta(spec, dtype)
        if ids is None:
            rows = list(range(self.rows[split]))
        else:
            rows = [int(i.rsplit("-", 1)[1]) for i in ids]
        fail_at, self.break_after = self.break_after, None

        def batches() -> Iterator[pa.RecordBatch]:
            for n, start in enumerate(range(0, len(rows), self.batch_rows)):
                if fail_at is not None and n >= fail_at:
                    raise ConnectionError("stream cut")
                part = rows[start : start + self.batch_rows]
                batch = encode(
                    meta,
                    [f"{split}-{i}" for i in part],
                    [self.label(split, i) for i in part],
                    self.features(split, spec, part),
                )
                self.bytes_received += batch_nbytes(batch)
                yield batch

        return feature_schema(meta), batches()

    def edge_init(self, method: str) -> EdgeInit:
        nbytes = sum(t.numel() * t.element_size() for t in self.init.values())
        self.bytes_received += nbytes
        return EdgeInit(method, self.g.backbone, self.g.weights, dict(self.init), nbytes=nbytes)

    def embed(
        self, images: Sequence[tuple[str, bytes]], spec: GatherSpec, dtype: str
    ) -> FeatureSet:
        raise NotImplementedError("MemorySource serves tasks by reference only")
