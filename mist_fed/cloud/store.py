"""The feature store: each image's features computed once, kept on disk as Arrow IPC shards.

Keyed by (backbone ``weights_id``, gather spec, dtype, image content hash). A shard is one
Arrow IPC file of rows ``hash, features[, scale]`` (encoded exactly as on the wire), named
after the SHA-256 of its bytes (``sha256-<hex>.arrow``), under
``<store dir>/<weights>/<gather>-<dtype>/``.

* **One writer.** The feature service writes (its embedder, and its ``warm`` call that fills
  the store ahead of a run); nothing else opens a store for writing.
* **Written whole, verified at write.** A shard is written to a temporary name, flushed to
  disk, read back and checked against its SHA-256, then renamed into place: a killed writer
  leaves no half shard under a shard's name.
* **Opened cheaply, verified lazily.** Opening a partition reads only its shards' ``hash``
  columns into an index (``hash -> (shard, row)``); a shard's bytes are checked against its
  name the first time a lookup finds rows in it. A truncated or damaged shard is dropped with
  a warning (its rows are recomputed), never served.
* **Mapped only while read.** A lookup memory-maps the shards it found and its locations hold
  those maps; they are unmapped when the request's batch is gone. The store keeps no shard
  mapped, so the pages a stream reads leave the service's RSS with the batch, and its memory
  does not grow with the bytes it has served or written (a split of any size).
* **Seen as soon as written.** A lookup that misses rescans the partition's directory when it
  changed since the last scan, so shards that another writer renamed into place are found.
* **Capped.** With ``max_bytes``, the store directory (every backbone's shards) is kept under
  the cap by deleting the least recently used shards after each write (use is tracked in
  memory and, at most once a minute per shard, in the file's mtime, so it survives a
  restart). Readers are safe: a lookup's locations hold the memory-mapped table itself, which
  stays readable after its file is deleted; evicted rows are simply misses from then on.

A store directory that cannot be written (read-only, disk full) does not stop the service:
the first failed write logs an error naming the directory, and from then on new features
are kept in memory only, for the life of the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from mist_fed.cloud.shards import (
    SHARD_PREFIX,
    Loc,
    Shard,
    _check_name,
    _damaged,
    content_hash,
    open_shard,
    read_shard,
)
from mist_fed.core.specs import GatherSpec
from mist_fed.files import atomic_path

log = logging.getLogger(__name__)

# re-exported: the store's callers and tests name them here
__all__ = [
    "SHARD_PREFIX",
    "FeatureStore",
    "Loc",
    "Shard",
    "content_hash",
    "open_shard",
    "read_shard",
]

TOUCH_EVERY_S = 60.0  # how often a shard's use is written to its mtime


def _safe(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _unwritable(where: Path, e: OSError) -> None:
    log.error(
        "feature store %s is not writable (%s: %s); new features are kept in memory only "
        "for this process. Free disk space or fix the directory's permissions "
        "(or pass another --cache-dir) to persist them.",
        where,
        type(e).__name__,
        e.strerror or e,
    )


class _Partition:
    """The shards of one (gather spec, dtype): the index of their rows."""

    def __init__(self, root: Path, store: FeatureStore) -> None:
        self.root = root
        self.store = store
        self.index: dict[str, tuple[Shard, int]] = {}
        self.shards: dict[str, Shard] = {}  # by file name (memory-only shards: by id)
        self.skipped: list[Path] = []
        self._seen: set[str] = set()  # file names scanned (good or damaged)
        self._mtime = -1
        if store.persist:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _unwritable(root, e)
                store.persist = False
        self.rescan()

    def rescan(self) -> bool:
        """Add shards that appeared since the last scan; True when the directory changed."""
        try:
            mtime = self.root.stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        # a directory changed within the file system's timestamp granularity of this scan may
        # change again without a new mtime: trust a recent mtime for nothing
        self._mtime = mtime if time.time() - mtime / 1e9 > 2.0 else -1
        for path in sorted(self.root.glob(f"{SHARD_PREFIX}*.arrow")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            try:
                table = open_shard(path, verify=False)  # checked on first use
                size = path.stat().st_size
                hashes = table.column("hash").to_pylist()
            except (pa.ArrowInvalid, OSError, ValueError) as e:
                _damaged(path, e)
                self.skipped.append(path)
                continue
            del table  # unmapped: lookups map what they read
            self._add(path.name, Shard(path, size, verified=False, hashes=hashes))
            self.store._budget_add(path, size)
        return True

    def _add(self, key: str, shard: Shard) -> None:
        self.shards[key] = shard
        for row, h in enumerate(shard.hashes):
            self.index[h] = (shard, row)

    def drop(self, shard: Shard) -> None:
        """Forget ``shard``'s rows (evicted or damaged); rows rewritten elsewhere stay."""
        for key, s in list(self.shards.items()):
            if s is shard:
                del self.shards[key]
        for h in shard.hashes:
            loc = self.index.get(h)
            if loc is not None and loc[0] is shard:
                del self.index[h]

    def write(self, table: pa.Table) -> Shard:
        if self.store.persist:
            try:
                shard = self._write_file(table)
                assert shard.path is not None
                self._seen.add(shard.path.name)
                self._add(shard.path.name, shard)
                return shard
            except OSError as e:
                _unwritable(self.root, e)
                self.store.persist = False
        hashes = table.column("hash").to_pylist()
        shard = Shard(None, table.nbytes, True, hashes, memory=table.combine_chunks())
        self._add(f"memory-{id(shard)}", shard)  # in memory only
        return shard

    def _write_file(self, table: pa.Table) -> Shard:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        data = sink.getvalue()
        final = self.root / f"{SHARD_PREFIX}{hashlib.sha256(memoryview(data)).hexdigest()}.arrow"
        with atomic_path(final) as tmp:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
            try:  # verify at write: the bytes on disk are the bytes meant, a whole Arrow file
                back = pa.memory_map(str(tmp)).read_buffer()
                _check_name(final, back)
                pa.ipc.open_file(back)
            except (ValueError, pa.ArrowInvalid) as e:
                raise OSError(f"shard {final.name} read back wrong from disk ({e})") from e
        return Shard(final, len(data), True, table.column("hash").to_pylist())


class FeatureStore:
    """Encoded features by image hash, for one backbone (``weights_id``); see the module doc.

    ``max_bytes`` caps the whole store directory (``root``'s parent: every backbone's shards);
    None: no cap.
    """

    def __init__(self, root: str | Path, weights_id: str, max_bytes: int | None = None) -> None:
        self.base = Path(root).expanduser()
        self.root = self.base / _safe(weights_id)
        self.weights_id = weights_id
        self.max_bytes = max_bytes
        self._parts: dict[tuple[str, str], _Partition] = {}
        self._lock = threading.RLock()
        self.persist = True
        self.counters = {"evicted_shards": 0, "evicted_bytes": 0, "damaged_shards": 0}
        self._lost_keys: set[tuple[str, str]] = set()  # (partition dir, hash) evicted or damaged
        # every shard file under the store directory: size and last use (mtime at start)
        self._budget: dict[Path, tuple[int, float]] = {}
        self._said_over = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "WEIGHTS_ID").write_text(weights_id + "\n")
        except OSError as e:
            _unwritable(self.root, e)
            self.persist = False
        self._scan_budget()
        with self._lock:
            self._enforce_cap(keep=None)

    # -- the size cap --------------------------------------------------------------------
    def _scan_budget(self) -> None:
        for path in self.base.glob(f"*/*/{SHARD_PREFIX}*.arrow"):
            with contextlib.suppress(OSError):
                st = path.stat()
                self._budget[path] = (st.st_size, st.st_mtime)

    def _budget_add(self, path: Path, size: int, used: float | None = None) -> None:
        old = self._budget.get(path)
        self._budget[path] = (size, used if used is not None else (old[1] if old else time.time()))

    @property
    def nbytes(self) -> int:
        """Bytes of shard files under the store directory (every backbone)."""
        with self._lock:
            return sum(size for size, _ in self._budget.values())

    def _use(self, shard: Shard) -> None:
        now = time.time()
        shard.used = now
        if shard.path is None:
            return
        self._budget_add(shard.path, shard.nbytes, now)
        if now - shard.touched >= TOUCH_EVERY_S:
            shard.touched = now
            with contextlib.suppress(OSError):
                os.utime(shard.path, (now, now))  # last use survives a restart

    def _enforce_cap(self, keep: Path | None) -> None:
        """Delete least recently used shard files until the store fits ``max_bytes``."""
        if self.max_bytes is None:
            return
        total = sum(size for size, _ in self._budget.values())
        if total <= self.max_bytes:
            return
        if keep is None:  # at start: a store bigger than its cap (a lowered --store-max-gb)
            log.warning(
                "feature store %s holds %.2f GB, over its cap of %.2f GB: evicting the least "
                "recently used shards (raise --store-max-gb to keep them)",
                self.base,
                total / 1e9,
                self.max_bytes / 1e9,
            )
        for path, (size, _) in sorted(self._budget.items(), key=lambda kv: kv[1][1]):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not evict store shard %s: %s", path, e)
                continue
            del self._budget[path]
            total -= size
            self.counters["evicted_shards"] += 1
            self.counters["evicted_bytes"] += size
            self._forget(path)
            log.info("evicted store shard %s (%d bytes, least recently used)", path, size)
        if total > self.max_bytes and not self._said_over:
            self._said_over = True
            log.warning(
                "feature store %s holds %.2f GB, over its cap of %.2f GB: the newest shard alone "
                "is larger; raise --store-max-gb",
                self.base,
                total / 1e9,
                self.max_bytes / 1e9,
            )

    def _forget(self, path: Path) -> None:
        for part in self._parts.values():
            if part.root == path.parent:
                shard = part.shards.get(path.name)
                if shard is not None:
                    part.drop(shard)
                    part._seen.discard(path.name)
                    self._lose(part, shard)

    def _lose(self, part: _Partition, shard: Shard) -> None:
        self._lost_keys.update((part.root.name, h) for h in shard.hashes)

    # -- partitions ----------------------------------------------------------------------
    def _part(self, spec: GatherSpec, dtype: str) -> _Partition:
        key = (spec.label(), dtype)
        part = self._parts.get(key)
        if part is None:
            part = _Partition(self.root / f"{spec.label()}-{dtype}", self)
            self._parts[key] = part
        return part

    @property
    def persistent(self) -> bool:
        """False once a write failed (or the directory was never writable): memory only."""
        with self._lock:
            return self.persist

    def _verify(self, part: _Partition, shards: list[Shard]) -> bool:
        """Check each unverified shard's bytes once; drop damaged ones. True if any dropped."""
        dropped = False
        for shard in shards:
            if shard.verified or shard.path is None:
                continue
            try:
                _check_name(shard.path, pa.memory_map(str(shard.path)).read_buffer())
                shard.verified = True
            except (OSError, ValueError) as e:
                _damaged(shard.path, e)
                part.drop(shard)
                self._lose(part, shard)
                part.skipped.append(shard.path)
                self.counters["damaged_shards"] += 1
                if isinstance(e, ValueError):  # proven damaged (not a passing read error)
                    self._budget.pop(shard.path, None)
                    with contextlib.suppress(OSError):
                        shard.path.unlink()
                dropped = True
        return dropped

    def lookup(self, spec: GatherSpec, dtype: str, hashes: Sequence[str]) -> list[Loc | None]:
        """Where each hash's row is stored (None: not stored); checks shards on first use."""
        with self._lock:
            part = self._part(spec, dtype)
            locs = [part.index.get(h) for h in hashes]
            if any(loc is None for loc in locs) and part.rescan():
                locs = [part.index.get(h) for h in hashes]
            found = list({id(loc[0]): loc[0] for loc in locs if loc is not None}.values())
            if self._verify(part, found):
                locs = [part.index.get(h) for h in hashes]
            tables: dict[int, pa.Table] = {}
            for shard in {id(loc[0]): loc[0] for loc in locs if loc is not None}.values():
                try:
                    tables[id(shard)] = shard.open()  # mapped for this read only
                except (pa.ArrowInvalid, OSError, ValueError) as e:
                    assert shard.path is not None
                    _damaged(shard.path, e)
                    part.drop(shard)
                    self._lose(part, shard)
                    continue
                self._use(shard)
            return [
                None if loc is None or id(loc[0]) not in tables else (*loc, tables[id(loc[0])])
                for loc in locs
            ]

    def put(
        self, spec: GatherSpec, dtype: str, hashes: Sequence[str], columns: dict[str, pa.Array]
    ) -> int:
        """Store encoded rows (``features`` and, for int8, ``scale``) under their hashes.

        Returns how many of them had been stored before and evicted (rows computed again).
        """
        table = pa.table({"hash": pa.array(list(hashes), pa.string()), **columns})
        with self._lock:
            part = self._part(spec, dtype)
            shard = part.write(table)
            again = sum((part.root.name, h) in self._lost_keys for h in hashes)
            if shard.path is not None:
                self._budget_add(shard.path, shard.nbytes, time.time())
                self._enforce_cap(keep=shard.path)
            return again

    def columns(self, spec: GatherSpec, dtype: str, locs: Sequence[Loc]) -> dict[str, pa.Array]:
        """The stored encoded columns for ``locs``, in order; contiguous runs are zero-copy slices.

        Safe after eviction: ``locs`` hold their shards' tables.
        """
        runs: list[tuple[pa.Table, int, int]] = []  # mapped table, start, length
        for _, row, table in locs:
            if runs and runs[-1][0] is table and runs[-1][1] + runs[-1][2] == row:
                t, start, length = runs[-1]
                runs[-1] = (t, start, length + 1)
            else:
                runs.append((table, row, 1))
        names = [n for n in runs[0][0].column_names if n != "hash"] if runs else []
        out: dict[str, pa.Array] = {}
        for name in names:
            pieces = [t.column(name).chunk(0).slice(start, n) for t, start, n in runs]
            out[name] = pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
        return out

    def size(self, spec: GatherSpec, dtype: str) -> int:
        with self._lock:
            return len(self._part(spec, dtype).index)

    def stats(self) -> dict[str, Any]:
        """Bytes and shards on disk, the cap, and what eviction and damage cost."""
        with self._lock:
            return {
                "dir": str(self.base),
                "bytes": sum(size for size, _ in self._budget.values()),
                "shards": len(self._budget),
                "max_bytes": self.max_bytes,
                "persistent": self.persist,
                **self.counters,
            }
