"""Files written whole or not at all: the one way mist-fed replaces a file on disk."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit it replaces ``path``.

    On an error the temporary file is removed and ``path`` is left as it was, so a reader sees
    the old file or the new one, never half of either. A killed process (or an interrupt,
    which is not an ``Exception``) leaves its temporary file: ``tmp`` names it where a module
    sweeps such leftovers by name; by default ``.<name>.<pid>.<thread>.tmp``.
    Durability (``fsync``) is the writer's choice: it can sync ``tmp`` before the block ends.
    """
    path = Path(path)
    if tmp is None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """``path.write_bytes(data)``, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
