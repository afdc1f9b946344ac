"""The on-device feature cache: each split pulled once into an Arrow IPC file, read batch by batch.

A device stores what it downloads under its storage directory, one file per feature set,
named by a hash of what makes the features (:class:`CacheKey`: cloud backbone and weights,
task, split, ids, gather, ``k``, wire dtype). The file keeps the wire's own record batches
(int8 stays int8 on disk) and a JSON sidecar records rows, labelled rows, the bytes paid for
it over the link, and a CRC32 per batch.

Reading never holds a split: :meth:`CachedSplit.batches` decodes one stored batch at a time
(plain reads, not a memory map, so no file-backed page stays resident), shuffles batch order
and rows within a small window each epoch, and yields training batches; :meth:`CachedSplit.chunks`
yields the stored batches in order for evaluation. A file whose sidecar is missing, whose size
differs or whose batches fail their CRC is corrupt: :meth:`FeatureCache.open` drops it and
returns ``None``, and the device fetches it again; it is never trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from mist_fed.errors import MistError, WireError
from mist_fed.wire.codec import WireMeta, batch_nbytes, decode
from mist_fed.wire.features import FeatureSet

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor]  # (features [b, *shape], labels [b])


class CacheCorruptError(MistError):
    """A cached feature file does not match its sidecar; it is dropped and fetched again."""


@dataclass(frozen=True)
class CacheKey:
    """What makes a feature set: the same key always names the same bytes."""

    backbone: str
    weights: str
    task: str
    split: str
    gather: str
    k: int | None
    dtype: str
    ids: tuple[str, ...] | None = None  # a subset of the split, in this order; None = all

    def digest(self) -> str:
        d = asdict(self)
        d["ids"] = None if self.ids is None else list(self.ids)
        raw = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:24]

    def label(self) -> str:
        k = "" if self.k is None else str(self.k)
        part = "" if self.ids is None else f"[{len(self.ids)} ids]"
        return f"{self.task}/{self.split}{part} {self.gather}{k} {self.dtype}"


def _batch_crc(batch: pa.RecordBatch) -> int:
    crc = 0
    for col in batch.columns:
        arr = col.storage if isinstance(col, pa.ExtensionArray) else col
        for buf in arr.buffers():
            if buf is not None:
                crc = zlib.crc32(memoryview(buf), crc)
    return crc


@dataclass
class CachedSplit:
    """One cached feature file: its metadata, and batch-by-batch reads of it."""

    path: Path
    key: CacheKey
    meta: WireMeta
    rows: int
    labelled: int  # rows with a known label
    num_batches: int
    paid_bytes: int  # bytes this file cost over the link, once
    max_label: int = -1  # the largest label (-1: none known)
    crcs: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta.shape)

    def __len__(self) -> int:
        return self.rows

    def _reader(self) -> contextlib.AbstractContextManager[pa.ipc.RecordBatchFileReader]:
        @contextlib.contextmanager
        def cm() -> Iterator[pa.ipc.RecordBatchFileReader]:
            pool = pa.system_memory_pool()  # freed batches go back to the OS, not a pool's cache
            with pa.OSFile(str(self.path), "rb", memory_pool=pool) as f:  # plain reads, no map
                yield pa.ipc.open_file(f, memory_pool=pool)

        return cm()

    def read(self, index: int, reader: pa.ipc.RecordBatchFileReader) -> FeatureSet:
        """Stored batch ``index``, CRC-checked and decoded (int8 dequantized to float32)."""
        batch = reader.get_batch(index)
        if self.crcs and _batch_crc(batch) != self.crcs[index]:
            raise CacheCorruptError(f"{self.path}: batch {index} fails its CRC")
        return decode(pa.Table.from_batches([batch]))

    def chunks(self) -> Iterator[FeatureSet]:
        """The stored batches in file order, one decoded at a time."""
        with self._reader() as reader:
            for i in range(reader.num_record_batches):
                yield self.read(i, reader)

    def eval_batches(self, batch_size: int = 64) -> Iterator[Batch]:
        """Labelled rows in file order, at most ``batch_size`` at a time."""
        for fs in self.chunks():
            x, y = _labelled(fs)
            for i in range(0, len(y), batch_size):
                yield x[i : i + batch_size], y[i : i + batch_size]

    def batches(
        self, batch_size: int, generator: torch.Generator, window_rows: int = 128
    ) -> Iterator[Batch]:
        """One epoch of shuffled training batches over the labelled rows.

        Stored batches are visited in a random order; rows are shuffled within a window of
        about ``window_rows`` rows; rows left over at a window's end join the next one, so an
        epoch yields ``ceil(labelled / batch_size)`` batches and only the last may be short.
        """
        order = torch.randperm(self.num_batches, generator=generator).tolist()
        window: list[Batch] = []
        size = 0
        with self._reader() as reader:
            for n, i in enumerate(order):
                x, y = _labelled(self.read(i, reader))
                if len(y):
                    window.append((x, y))
                    size += len(y)
                last = n == len(order) - 1
                if size >= window_rows or last:
                    carry = yield from _emit(window, batch_size, generator, flush=last)
                    window = [carry] if carry is not None else []
                    size = 0 if carry is None else len(carry[1])


def _labelled(fs: FeatureSet) -> Batch:
    """The rows with a known label (no copy when every row has one)."""
    keep = fs.labels >= 0
    if bool(keep.all()):
        return fs.features, fs.labels
    return fs.features[keep], fs.labels[keep]


def _emit(
    window: list[Batch], batch_size: int, generator: torch.Generator, flush: bool
) -> Generator[Batch, None, Batch | None]:
    """Shuffled batches from the rows of ``window``; returns the rows left (copied), if any."""
    index = [(c, r) for c, (_, y) in enumerate(window) for r in range(len(y))]
    perm = torch.randperm(len(index), generator=generator).tolist()
    full = len(perm) - (0 if flush else len(perm) % batch_size)
    for b in range(0, full, batch_size):
        pick = [index[p] for p in perm[b : b + batch_size]]
        yield _stack(window, pick)
    if full == len(perm):
        return None
    x, y = _stack(window, [index[p] for p in perm[full:]])
    return x.clone(), y.clone()


def _stack(window: list[Batch], pick: list[tuple[int, int]]) -> Batch:
    x = torch.stack([window[c][0][r] for c, r in pick])
    y = torch.stack([window[c][1][r] for c, r in pick])
    return x, y


class FeatureCache:
    """A device's feature files under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: CacheKey) -> tuple[Path, Path]:
        base = self.root / key.digest()
        return base.with_suffix(".arrow"), base.with_suffix(".json")

    def open(self, key: CacheKey) -> CachedSplit | None:
        """The cached split for ``key``, verified; ``None`` if absent or dropped as corrupt."""
        path, side = self._paths(key)
        if not path.exists() and not side.exists():
            return None
        try:
            split = self._load(key, path, side)
            self.verify(split)
            return split
        except (CacheCorruptError, OSError, ValueError, KeyError, pa.ArrowException) as e:
            log.warning(
                "cached %s is unreadable (%s); dropping it, it will be fetched again",
                key.label(),
                e,
            )
            self.drop(key)
            return None

    def _load(self, key: CacheKey, path: Path, side: Path) -> CachedSplit:
        info: dict[str, Any] = json.loads(side.read_text())
        if info.get("version") != SIDECAR_VERSION or info.get("key") != key.digest():
            raise CacheCorruptError(f"{side} belongs to another key or version")
        if path.stat().st_size != info["file_bytes"]:
            raise CacheCorruptError(
                f"{path} is {path.stat().st_size} bytes, its sidecar says {info['file_bytes']}"
            )
        with pa.OSFile(str(path), "rb") as f:
            reader = pa.ipc.open_file(f)
            meta = WireMeta.from_schema(reader.schema)
            num_batches = reader.num_record_batches
        if num_batches != len(info["crcs"]):
            raise CacheCorruptError(
                f"{path} holds {num_batches} batches, its sidecar {len(info['crcs'])}"
            )
        return CachedSplit(
            path=path,
            key=key,
            meta=meta,
            rows=int(info["rows"]),
            labelled=int(info["labelled"]),
            num_batches=num_batches,
            paid_bytes=int(info["paid_bytes"]),
            max_label=int(info["max_label"]),
            crcs=tuple(int(c) for c in info["crcs"]),
        )

    @staticmethod
    def verify(split: CachedSplit) -> None:
        """Read every batch once and check its CRC and the row count (nothing is kept)."""
        rows = 0
        with split._reader() as reader:
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if _batch_crc(batch) != split.crcs[i]:
                    raise CacheCorruptError(f"{split.path}: batch {i} fails its CRC")
                rows += batch.num_rows
        if rows != split.rows:
            raise CacheCorruptError(f"{split.path} holds {rows} rows, its sidecar {split.rows}")

    def drop(self, key: CacheKey) -> None:
        for p in self._paths(key):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def store(
        self,
        key: CacheKey,
        schema: pa.Schema,
        batches: Iterator[pa.RecordBatch],
        paid: Callable[[], int] | None = None,
    ) -> CachedSplit:
        """Write ``batches`` as they arrive into ``key``'s file (atomically), then open it.

        ``paid()`` gives the bytes the link carried for them (default: the batches' own bytes).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path, side = self._paths(key)
        tmp = path.with_suffix(f".arrow.{os.getpid()}.tmp")
        rows = labelled = nbytes = 0
        max_label = -1
        crcs: list[int] = []
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
                    crcs.append(_batch_crc(batch))
                    rows += batch.num_rows
                    labels = [v for v in batch.column("label").to_pylist() if v is not None]
                    labelled += len(labels)
                    max_label = max([max_label, *labels])
                    nbytes += batch_nbytes(batch)
            if rows == 0:  # nothing to keep: a later open fetches again
                raise WireError(f"the cloud sent no rows for {key.label()}")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        info = {
            "version": SIDECAR_VERSION,
            "key": key.digest(),
            "what": asdict(key) | {"ids": None if key.ids is None else len(key.ids)},
            "rows": rows,
            "labelled": labelled,
            "max_label": max_label,
            "paid_bytes": paid() if paid is not None else nbytes,
            "file_bytes": path.stat().st_size,
            "crcs": crcs,
        }
        side_tmp = side.with_suffix(f".json.{os.getpid()}.tmp")
        side_tmp.write_text(json.dumps(info) + "\n")
        os.replace(side_tmp, side)
        return self._load(key, path, side)
