"""What a device waits for: rows of a split received / its total, and the rate, as they arrive.

A cold split streams as fast as the cloud embeds it, so rows received are the rows ready. On a
terminal :class:`StreamProgress` draws a bar (tqdm, on stderr); elsewhere it logs one line at
most every ``every_s`` seconds (30 by default) on the ``mist_fed.wire.progress`` logger, and
one when the stream ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


class StreamProgress:
    """Counts a stream's rows; ``bar``: a tqdm bar, else log lines every ``every_s`` seconds."""

    def __init__(
        self, desc: str, total: int | None, *, bar: bool, every_s: float | None = None
    ) -> None:
        self.desc = desc
        self.total = total
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.rows = 0
        self.start = time.monotonic()
        self._last_log = self.start
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, total=total, unit="img", leave=False)

    def line(self) -> str:
        took = max(time.monotonic() - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.desc}: {self.rows}{of} rows ready, {self.rows / took:.1f} rows/s"

    def update(self, rows: int) -> None:
        self.rows += rows
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.rows:
            log.info("%s (done in %.0f s)", self.line(), time.monotonic() - self.start)


def counted(
    batches: Iterator[pa.RecordBatch], progress: StreamProgress
) -> Iterator[pa.RecordBatch]:
    """``batches`` as they come, each counted on ``progress`` (closed at the end)."""
    try:
        for batch in batches:
            progress.update(batch.num_rows)
            yield batch
    finally:
        progress.close()
