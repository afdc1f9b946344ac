"""The feature store: each image's features computed once, kept on disk as Arrow IPC shards.

Keyed by (backbone ``weights_id``, gather spec, dtype, image content hash). A shard is one
Arrow IPC file of rows ``hash, features[, scale]`` (encoded exactly as on the wire), named
after the SHA-256 of its bytes (``sha256-<hex>.arrow``). It is written to a temporary name,
flushed to disk and renamed into place, so a killed writer leaves no half shard under a
shard's name; on load every shard's bytes are checked against its name and its Arrow footer
is read, so a truncated or damaged shard is skipped with a warning (its rows are recomputed),
never served. Shards are memory-mapped; an in-memory index maps each hash to
``(shard, row)``. Rows served in the order they were stored come out as zero-copy slices.

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
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from mist_fed.model.gather import GatherSpec

log = logging.getLogger(__name__)

Loc = tuple[int, int]  # (shard number, row)
SHARD_PREFIX = "sha256-"


def content_hash(data: bytes) -> str:
    """The key of one image's content (hash of its decoded pixels, mode and size)."""
    return hashlib.sha256(data).hexdigest()[:32]


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


def read_shard(path: Path) -> pa.Table:
    """A shard's table, after checking its bytes against its name and its Arrow footer.

    Raises ``ValueError`` (checksum), ``pa.ArrowInvalid`` (not a whole Arrow file) or ``OSError``.
    """
    buf = pa.memory_map(str(path)).read_buffer()
    if path.name.startswith(SHARD_PREFIX):
        want = path.name.removeprefix(SHARD_PREFIX).removesuffix(".arrow")
        got = hashlib.sha256(memoryview(buf)).hexdigest()
        if got != want:
            raise ValueError(f"checksum mismatch (content sha256 {got[:12]}...)")
    table = pa.ipc.open_file(buf).read_all()
    if "hash" not in table.column_names or "features" not in table.column_names:
        raise ValueError(f"not a feature shard (columns {table.column_names})")
    return table


class _Partition:
    """The shards of one (gather spec, dtype): index and memory-mapped tables."""

    def __init__(self, root: Path, persist: bool = True) -> None:
        self.root = root
        self.persist = persist
        self.shards: list[pa.Table] = []
        self.index: dict[str, Loc] = {}
        self.skipped: list[Path] = []
        if self.persist:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _unwritable(root, e)
                self.persist = False
        for path in sorted(root.glob("*.arrow")) if root.is_dir() else []:
            try:
                self._add(read_shard(path))
            except (pa.ArrowInvalid, OSError, ValueError) as e:
                # a damaged shard costs a recompute, never a crash, and is never served
                log.warning(
                    "skipping damaged store shard %s (its rows are recomputed): %s", path, e
                )
                self.skipped.append(path)

    def _add(self, table: pa.Table) -> None:
        table = table.combine_chunks()
        n = len(self.shards)
        self.shards.append(table)
        for row, h in enumerate(table.column("hash").to_pylist()):
            self.index[h] = (n, row)

    def write(self, table: pa.Table) -> None:
        if self.persist:
            try:
                self._add(self._write_file(table))
                return
            except OSError as e:
                _unwritable(self.root, e)
                self.persist = False
        self._add(table)  # in memory only

    def _write_file(self, table: pa.Table) -> pa.Table:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        data = sink.getvalue()
        final = self.root / f"{SHARD_PREFIX}{hashlib.sha256(memoryview(data)).hexdigest()}.arrow"
        tmp = self.root / f".{final.stem}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return pa.ipc.open_file(pa.memory_map(str(final))).read_all()


class FeatureStore:
    """Encoded features by image hash, for one backbone (``weights_id``)."""

    def __init__(self, root: str | Path, weights_id: str) -> None:
        self.root = Path(root).expanduser() / _safe(weights_id)
        self.weights_id = weights_id
        self._parts: dict[tuple[str, str], _Partition] = {}
        self._lock = threading.Lock()
        self.persist = True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "WEIGHTS_ID").write_text(weights_id + "\n")
        except OSError as e:
            _unwritable(self.root, e)
            self.persist = False

    def _part(self, spec: GatherSpec, dtype: str) -> _Partition:
        key = (spec.label(), dtype)
        part = self._parts.get(key)
        if part is None:
            part = _Partition(self.root / f"{spec.label()}-{dtype}", self.persist)
            self._parts[key] = part
        return part

    @property
    def persistent(self) -> bool:
        """False once a write failed (or the directory was never writable): memory only."""
        with self._lock:
            return self.persist and all(p.persist for p in self._parts.values())

    def lookup(self, spec: GatherSpec, dtype: str, hashes: Sequence[str]) -> list[Loc | None]:
        with self._lock:
            index = self._part(spec, dtype).index
            return [index.get(h) for h in hashes]

    def put(
        self, spec: GatherSpec, dtype: str, hashes: Sequence[str], columns: dict[str, pa.Array]
    ) -> None:
        """Store encoded rows (``features`` and, for int8, ``scale``) under their hashes."""
        table = pa.table({"hash": pa.array(list(hashes), pa.string()), **columns})
        with self._lock:
            part = self._part(spec, dtype)
            part.write(table)
            if not part.persist:
                self.persist = False

    def columns(self, spec: GatherSpec, dtype: str, locs: Sequence[Loc]) -> dict[str, pa.Array]:
        """The stored encoded columns for ``locs``, in order; contiguous runs are zero-copy slices."""
        with self._lock:
            shards = list(self._part(spec, dtype).shards)
        runs: list[tuple[int, int, int]] = []  # shard, start, length
        for shard, row in locs:
            if runs and runs[-1][0] == shard and runs[-1][1] + runs[-1][2] == row:
                s, start, length = runs[-1]
                runs[-1] = (s, start, length + 1)
            else:
                runs.append((shard, row, 1))
        names = [n for n in shards[runs[0][0]].column_names if n != "hash"] if runs else []
        out: dict[str, pa.Array] = {}
        for name in names:
            pieces = [shards[s].column(name).chunk(0).slice(start, n) for s, start, n in runs]
            out[name] = pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
        return out

    def size(self, spec: GatherSpec, dtype: str) -> int:
        with self._lock:
            return len(self._part(spec, dtype).index)
