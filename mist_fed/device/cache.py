"""The on-device feature cache: each split pulled once into an Arrow IPC file, read batch by batch.

A device stores what it downloads under its storage directory, one file per feature set,
named by a hash of what makes the features (:class:`CacheKey`: cloud backbone and weights,
task, split, ids, gather, ``k``, wire dtype). The file keeps the wire's record batches' bytes
(int8 stays int8 on disk), one row per stored batch, and a JSON sidecar records rows, labelled
rows, the bytes paid for it over the link, and a CRC32 per stored row.

Reading never holds a split: :meth:`CachedSplit.batches` draws a uniform permutation of every
labelled row each epoch, as a shuffle in memory would, and reads each training batch's rows
alone (plain reads, not a memory map, so no file-backed page stays resident); the order the
cloud sent the rows in, a class-grouped one included, does not reach training.
:meth:`CachedSplit.eval_batches` reads the rows in file order. A file whose sidecar is
missing, whose size differs or whose rows fail their CRC is corrupt: :meth:`FeatureCache.open`
drops it and returns ``None``, and the device fetches it again; it is never trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from mist_fed.errors import MistError, WireError
from mist_fed.files import atomic_path
from mist_fed.wire.codec import WireMeta, batch_nbytes, decode

log = logging.getLogger(__name__)

SIDECAR_VERSION = 2  # one row per stored batch (1: the wire's own batches, rewritten on open)
READABLE_VERSIONS = (1, SIDECAR_VERSION)
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
    """One cached feature file (one row per stored batch): its metadata, and row reads of it."""

    path: Path
    key: CacheKey
    meta: WireMeta
    rows: int
    labelled: int  # rows with a known label
    num_batches: int
    paid_bytes: int  # bytes this file cost over the link, once
    max_label: int = -1  # the largest label (-1: none known)
    crcs: tuple[int, ...] = ()
    unlabelled: tuple[int, ...] = ()  # rows whose label is unknown, in file order

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta.shape)

    def __len__(self) -> int:
        return self.rows

    def labelled_rows(self) -> torch.Tensor:
        """The positions of the labelled rows, in file order."""
        keep = torch.ones(self.rows, dtype=torch.bool)
        keep[list(self.unlabelled)] = False
        return torch.nonzero(keep).flatten()

    @contextlib.contextmanager
    def _reader(self) -> Iterator[pa.ipc.RecordBatchFileReader]:
        pool = pa.system_memory_pool()  # freed batches go back to the OS, not a pool's cache
        with pa.OSFile(str(self.path), "rb", memory_pool=pool) as f:  # plain reads, no map
            yield pa.ipc.open_file(f, memory_pool=pool)

    def _rows(self, reader: pa.ipc.RecordBatchFileReader, rows: Iterable[int]) -> Batch:
        """Rows ``rows`` (stored batches, one row each), CRC-checked, decoded in that order."""
        got: list[pa.RecordBatch] = []
        for i in rows:
            batch = reader.get_batch(i)
            if self.crcs and _batch_crc(batch) != self.crcs[i]:
                raise CacheCorruptError(f"{self.path}: row {i} fails its CRC")
            got.append(batch)
        fs = decode(pa.concat_batches(got))  # one batch: decoding pays its checks once
        return fs.features, fs.labels

    def eval_batches(self, batch_size: int = 64) -> Iterator[Batch]:
        """Labelled rows in file order, at most ``batch_size`` at a time."""
        rows = self.labelled_rows().tolist()
        with self._reader() as reader:
            for b in range(0, len(rows), batch_size):
                yield self._rows(reader, rows[b : b + batch_size])

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches over the labelled rows, shuffled as a whole.

        The same rows in the same order as :meth:`~mist_fed.wire.features.FeatureSet.batches`
        on the split held in memory with the same generator: a uniform permutation of every
        labelled row, whatever order the cloud sent them in (a class-grouped split included).
        Each batch reads only its own rows from the file (one stored batch per row), so memory
        holds one batch.
        """
        rows = self.labelled_rows()
        order = rows[torch.randperm(len(rows), generator=generator)].tolist()
        with self._reader() as reader:
            for b in range(0, len(order), batch_size):
                yield self._rows(reader, order[b : b + batch_size])


class FeatureCache:
    """A device's feature files under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._clear_orphans()

    def _clear_orphans(self) -> None:
        """Remove the temp files of writers that died mid-write (``<key>.<ext>.<pid>.tmp``
        whose process is gone): a killed client leaves no partial file behind for good."""
        for tmp in self.root.glob("*.*.tmp") if self.root.is_dir() else ():
            pid = tmp.suffixes[-2].lstrip(".") if len(tmp.suffixes) >= 2 else ""
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    log.info("removed %s, left by a writer that died mid-write", tmp.name)

    def _paths(self, key: CacheKey) -> tuple[Path, Path]:
        base = self.root / key.digest()
        return base.with_suffix(".arrow"), base.with_suffix(".json")

    def open(self, key: CacheKey) -> CachedSplit | None:
        """The cached split for ``key``, verified; ``None`` if absent or dropped as corrupt.

        A file of the previous layout (the wire's own batches, sidecar version 1) is verified
        and rewritten in place one row per batch: no download, the bytes paid are kept.
        """
        path, side = self._paths(key)
        if not path.exists() and not side.exists():
            return None
        try:
            split = self._load(key, path, side)
            self.verify(split)
            if split.num_batches != split.rows:
                log.info("rewriting cached %s one row per batch (local, no download)", key.label())
                split = self._rewrite(split)
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
        version = info.get("version")
        if version not in READABLE_VERSIONS or info.get("key") != key.digest():
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
        if version == SIDECAR_VERSION and num_batches != int(info["rows"]):
            raise CacheCorruptError(f"{path} holds {num_batches} batches for {info['rows']} rows")
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
            unlabelled=tuple(int(i) for i in info.get("unlabelled", ())),
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

    def _rewrite(self, split: CachedSplit) -> CachedSplit:
        """``split`` stored again one row per batch, from its own file."""

        def stored() -> Iterator[pa.RecordBatch]:
            with split._reader() as reader:
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)

        with split._reader() as reader:
            schema = reader.schema
        return self.store(split.key, schema, stored(), paid=lambda: split.paid_bytes)

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

        Each row is stored as a batch of its own, so training can read any row alone (a
        shuffle over the whole split, see :meth:`CachedSplit.batches`). ``paid()`` gives the
        bytes the link carried for them (default: the batches' own bytes).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path, side = self._paths(key)
        rows = labelled = nbytes = 0
        max_label = -1
        unlabelled: list[int] = []
        # temp files are named <key>.<ext>.<pid>.tmp: _clear_orphans finds a dead writer's
        with atomic_path(path, path.with_suffix(f".arrow.{os.getpid()}.tmp")) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in batches:
                    for i in range(batch.num_rows):
                        writer.write_batch(batch.slice(i, 1))
                    for i, v in enumerate(batch.column("label").to_pylist()):
                        if v is None:
                            unlabelled.append(rows + i)
                        else:
                            labelled += 1
                            max_label = max(max_label, v)
                    rows += batch.num_rows
                    nbytes += batch_nbytes(batch)
            if rows == 0:  # nothing to keep: a later open fetches again
                raise WireError(f"the cloud sent no rows for {key.label()}")
            crcs = _file_crcs(tmp)  # of the rows as stored (a slice's buffers are its parent's)
        info = {
            "version": SIDECAR_VERSION,
            "key": key.digest(),
            "what": asdict(key) | {"ids": None if key.ids is None else len(key.ids)},
            "rows": rows,
            "labelled": labelled,
            "max_label": max_label,
            "unlabelled": unlabelled,
            "paid_bytes": paid() if paid is not None else nbytes,
            "file_bytes": path.stat().st_size,
            "crcs": crcs,
        }
        with atomic_path(side, side.with_suffix(f".json.{os.getpid()}.tmp")) as side_tmp:
            side_tmp.write_text(json.dumps(info) + "\n")
        return self._load(key, path, side)


def _file_crcs(path: Path) -> list[int]:
    """The CRC of each stored batch of the Arrow file at ``path``, read back one at a time."""
    pool = pa.system_memory_pool()
    with pa.OSFile(str(path), "rb", memory_pool=pool) as f:
        reader = pa.ipc.open_file(f, memory_pool=pool)
        return [_batch_crc(reader.get_batch(i)) for i in range(reader.num_record_batches)]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 asks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
