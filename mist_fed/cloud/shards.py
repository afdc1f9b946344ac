"""Shard files of the feature store: naming, opening (memory-mapped), checking, and the
:class:`Shard` record the store indexes (see :mod:`mist_fed.cloud.store`)."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger("mist_fed.cloud.store")

SHARD_PREFIX = "sha256-"


@dataclass(eq=False)
class Shard:
    """One shard: its file (None: memory only), row hashes, size and last use.

    A file's table is mapped by :meth:`open` for one read and unmapped when that read's
    arrays are gone; a memory-only shard (an unwritable store) holds its table.
    """

    path: Path | None
    nbytes: int
    verified: bool
    hashes: list[str]
    memory: pa.Table | None = None
    used: float = field(default_factory=time.time)
    touched: float = 0.0

    def open(self) -> pa.Table:
        """The shard's table, memory-mapped (raises like :func:`open_shard`)."""
        if self.memory is not None:
            return self.memory
        assert self.path is not None
        return open_shard(self.path, verify=False)


# (shard, row, its mapped table): holds the table, so eviction cannot pull it away
Loc = tuple[Shard, int, pa.Table]


def content_hash(data: bytes) -> str:
    """The key of one image's content (hash of its decoded pixels, mode and size)."""
    return hashlib.sha256(data).hexdigest()[:32]


def _check_name(path: Path, buf: Any) -> None:
    if path.name.startswith(SHARD_PREFIX):
        want = path.name.removeprefix(SHARD_PREFIX).removesuffix(".arrow")
        got = hashlib.sha256(memoryview(buf)).hexdigest()
        if got != want:
            raise ValueError(f"checksum mismatch (content sha256 {got[:12]}...)")


def open_shard(path: Path, verify: bool = True) -> pa.Table:
    """A shard's memory-mapped table (its Arrow footer read; its checksum too when ``verify``).

    Raises ``ValueError`` (checksum, columns), ``pa.ArrowInvalid`` (not a whole Arrow file) or
    ``OSError``.
    """
    buf = pa.memory_map(str(path)).read_buffer()
    if verify:
        _check_name(path, buf)
    table = pa.ipc.open_file(buf).read_all()
    if "hash" not in table.column_names or "features" not in table.column_names:
        raise ValueError(f"not a feature shard (columns {table.column_names})")
    return table.combine_chunks()


def read_shard(path: Path) -> pa.Table:
    """A shard's table after checking its bytes against its name (see :func:`open_shard`)."""
    return open_shard(path, verify=True)


def _damaged(path: Path, e: Exception) -> None:
    # a damaged shard costs a recompute, never a crash, and is never served
    log.warning("skipping damaged store shard %s (its rows are recomputed): %s", path, e)
