"""The feature store: each image's features computed once, kept on disk as Arrow IPC shards.

Keyed by (backbone ``weights_id``, gather spec, dtype, image content hash). A shard is one
Arrow IPC file of rows ``hash, features[, scale]`` (encoded exactly as on the wire), written to
a temporary name and renamed into place, so readers never see half a file. Shards are
memory-mapped; an in-memory index maps each hash to ``(shard, row)``. Rows served in the
order they were stored come out as zero-copy slices of one shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from mist_fed.model.gather import GatherSpec

log = logging.getLogger(__name__)

Loc = tuple[int, int]  # (shard number, row)


def content_hash(data: bytes) -> str:
    """The key of one image's content (hash of its decoded pixels, mode and size)."""
    return hashlib.sha256(data).hexdigest()[:32]


def _safe(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


class _Partition:
    """The shards of one (gather spec, dtype): index and memory-mapped tables."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shards: list[pa.Table] = []
        self.index: dict[str, Loc] = {}
        root.mkdir(parents=True, exist_ok=True)
        for path in sorted(root.glob("*.arrow")):
            try:
                self._add(pa.ipc.open_file(pa.memory_map(str(path))).read_all())
            except (
                pa.ArrowInvalid,
                OSError,
            ) as e:  # a damaged shard costs a recompute, not a crash
                log.warning("skipping unreadable store shard %s: %s", path, e)

    def _add(self, table: pa.Table) -> None:
        table = table.combine_chunks()
        n = len(self.shards)
        self.shards.append(table)
        for row, h in enumerate(table.column("hash").to_pylist()):
            self.index[h] = (n, row)

    def write(self, table: pa.Table) -> None:
        final = self.root / f"{uuid.uuid4().hex}.arrow"
        tmp = final.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        os.replace(tmp, final)
        self._add(pa.ipc.open_file(pa.memory_map(str(final))).read_all())


class FeatureStore:
    """Encoded features by image hash, for one backbone (``weights_id``)."""

    def __init__(self, root: str | Path, weights_id: str) -> None:
        self.root = Path(root).expanduser() / _safe(weights_id)
        self.weights_id = weights_id
        self._parts: dict[tuple[str, str], _Partition] = {}
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "WEIGHTS_ID").write_text(weights_id + "\n")

    def _part(self, spec: GatherSpec, dtype: str) -> _Partition:
        key = (spec.label(), dtype)
        part = self._parts.get(key)
        if part is None:
            part = _Partition(self.root / f"{spec.label()}-{dtype}")
            self._parts[key] = part
        return part

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
            self._part(spec, dtype).write(table)

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
