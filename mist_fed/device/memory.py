"""The device memory cap: measure this process's peak RSS and stop a job that exceeds it.

``RLIMIT_AS`` is useless with torch (it maps gigabytes of address space it never touches), so
the cap is enforced three ways, from cheapest to last resort:

1. :func:`estimate_train_mb` refuses a job whose resident features plus training working
   set cannot fit, before anything is allocated;
2. :class:`MemoryGuard` samples resident memory (``VmRSS``) on a thread, reads the kernel's
   high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) at every check and on
   exit, and raises :class:`ResourceLimitError` "exceeds device memory" with the measured peak;
3. optionally (``hard=True``, the standalone client) ``RLIMIT_DATA`` bounds the growth of
   private data to the cap's headroom plus slack, so a runaway allocation fails in the
   allocator instead of swapping the host; that failure is reported the same way.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import threading
from pathlib import Path
from types import TracebackType

from mist_fed.errors import ResourceLimitError

log = logging.getLogger(__name__)

MB = 2**20
_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Resident set size of this process now."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size since start or the last :func:`reset_peak_rss`."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def tune_allocator(mmap_threshold: int = 64 * 1024) -> bool:
    """Serve large blocks from fresh mappings that return to the OS when freed (glibc only).

    glibc raises its mmap threshold after the first large free, so later multi-MB
    activations land in the heap and fragment it: peak RSS then creeps up step after step.
    A fixed threshold keeps a training step's peak near its true working set (measured: the
    micro-batched LAE step's rise drops from ~190 MB to ~90 MB). Returns False where unsupported.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    except (OSError, AttributeError):
        return False


def data_mb() -> float | None:
    kb = _status_kb("VmData")
    return kb / 1024 if kb is not None else None


def estimate_train_mb(
    rows: int,
    feature_shape: tuple[int, ...],
    feature_bytes: int,
    micro_batch: int,
    edge_params: int = 400_000,
    grad_checkpointing: bool = True,
    depth: int = 4,
) -> float:
    """Rough working set above the baseline: resident features + activations + params/optimizer.

    Activations: about ``(3 + 5 * blocks)`` fp32 copies of one micro-batch of features
    (one per block with checkpointing).
    """
    per_row = 1
    for s in feature_shape:
        per_row *= s
    features = rows * per_row * feature_bytes
    copies = 3 + (1 if grad_checkpointing else 5) * max(depth, 1)
    activations = copies * micro_batch * per_row * 4
    params = edge_params * 4 * 4  # weights, grads, two AdamW moments
    return (features + activations + params) / MB


def check_fits(need_mb: float, cap_mb: float, profile: str, what: str = "job") -> None:
    """Refuse before allocating when the estimated total exceeds the device memory."""
    if need_mb > cap_mb:
        raise ResourceLimitError(
            f"{what} exceeds device memory of profile {profile!r}: needs about {need_mb:.0f} MB "
            f"of {cap_mb:.0f} MB. Use fp16 or int8 features (--dtype), a smaller --micro-batch, "
            "fewer images, or a profile with more memory"
        )


class MemoryGuard:
    """Keep this process under ``cap_mb`` resident; raise "exceeds device memory" otherwise."""

    def __init__(
        self,
        cap_mb: float,
        profile: str = "device",
        interval_s: float = 0.02,
        hard: bool = False,
        hard_slack_mb: float = 512,
        counts_runtime: bool = True,
    ) -> None:
        """``counts_runtime``: the cap covers the whole process (a real device runs only this
        client); False: only the rise over the RSS at entry (a simulated device in a worker
        process whose runtime another device also shares)."""
        self.cap_mb = cap_mb
        self.profile = profile
        self.interval_s = interval_s
        self.hard = hard
        self.hard_slack_mb = hard_slack_mb
        self.counts_runtime = counts_runtime
        self.peak_mb = 0.0
        self.baseline_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_limit: tuple[int, int] | None = None

    # -- measuring -----------------------------------------------------------------------
    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def measure(self) -> float:
        """The peak RSS so far (file-backed pages included), in MB."""
        self.peak_mb = max(self.peak_mb, peak_rss_mb(), rss_mb())
        return self.peak_mb

    @property
    def rise_mb(self) -> float:
        """Peak RSS above the RSS at entry: what the job itself added."""
        return max(0.0, self.peak_mb - self.baseline_mb)

    @property
    def used_mb(self) -> float:
        """What counts against the cap (see ``counts_runtime``)."""
        return self.peak_mb if self.counts_runtime else self.rise_mb

    def error(self, cause: str = "") -> ResourceLimitError:
        return ResourceLimitError(
            f"job exceeds device memory of profile {self.profile!r}: measured peak RSS "
            f"{'' if self.counts_runtime else 'rise '}{self.used_mb:.0f} MB > {self.cap_mb:.0f} MB{cause}. Use fp16 or int8 features "
            "(--dtype), a smaller --micro-batch, or a profile with more memory"
        )

    def check(self, *_: object) -> None:
        """Raise if the peak so far is over the cap (usable as a trainer step hook)."""
        self.measure()
        if self.used_mb > self.cap_mb:
            raise self.error()

    # -- context -------------------------------------------------------------------------
    def __enter__(self) -> MemoryGuard:
        reset_peak_rss()
        self.baseline_mb = rss_mb()
        self.peak_mb = self.baseline_mb
        if self.counts_runtime and self.baseline_mb > self.cap_mb:
            raise self.error(" before the job started (the runtime alone does not fit)")
        if self.hard:
            self._set_data_limit()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="memory-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._restore_data_limit()
        self.measure()
        if exc is not None and _is_oom(exc):
            raise self.error(f" (allocation failed: {exc})") from exc
        if exc is None and self.used_mb > self.cap_mb:
            raise self.error()

    def _set_data_limit(self) -> None:
        data = data_mb()
        if data is None:
            log.info("no VmData on this platform; memory cap is measured, not enforced")
            return
        headroom = max(self.cap_mb - self.baseline_mb, 0) + self.hard_slack_mb
        limit = int((data + headroom) * MB)
        with contextlib.suppress(ValueError, OSError):
            self._old_limit = resource.getrlimit(resource.RLIMIT_DATA)
            hard = self._old_limit[1]
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
            log.info("RLIMIT_DATA set to %.0f MB (VmData %.0f MB now)", limit / MB, data)

    def _restore_data_limit(self) -> None:
        if self._old_limit is not None:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_DATA, self._old_limit)
            self._old_limit = None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in msg or "not enough memory" in msg or "out of memory" in msg
    )
