"""An unreliable link under a feature stream: packet loss, connection resets and stalls.

A device profile may say its link loses packets (``loss_pct``), drops the connection every
``reset_every_mb`` megabytes (10^6 bytes) and stalls for ``stall_s`` seconds every
``stall_every_mb`` megabytes. :class:`FaultyLink` applies them to the batches a
:class:`~mist_fed.wire.flight.FeatureClient` receives over its real Flight stream:

* **Loss** is what TCP makes of it: lost segments are sent again, so the data arrive intact but
  later and at a cost in bytes. Each batch is cut into ``MSS``-byte segments; each is lost with
  probability ``loss_pct / 100`` (a seeded draw: the same device, seed and stream lose the same
  segments) and its bytes count again in what crossed the link (``bytes_down``). The delay is
  the device clock's (:meth:`mist_fed.device.profiles.DeviceProfile.downlink_seconds`).
* **A reset** drops the connection inside the batch that crosses the mark: the bytes it carried
  so far are counted and lost, the client cancels the real stream and resumes it with a new
  ``do_get`` from its last complete batch (a reset is a transient error of the stream).
* **A stall** holds the stream for ``stall_s``: a stall at least as long as the client's stall
  timeout is cut and resumed as a reset is; a shorter one pauses the stream through ``pause``
  (a link shaper's scaled sleep; nothing in a fleet, whose time is the device clock's).

:func:`stall_guard` is how the client notices a stall of the real stream.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.flight as flight

from mist_fed.errors import ConfigError

MSS = 1448  # bytes of payload in one TCP segment (Ethernet MTU 1500 less IP and TCP headers)
MB = 1_000_000  # link megabytes are decimal, like its Mbit/s


@dataclass(frozen=True)
class LinkFaults:
    """What goes wrong on a link: ``loss_pct`` in [0, 50), the rest >= 0 (0: never)."""

    loss_pct: float = 0.0
    reset_every_mb: float = 0.0
    stall_every_mb: float = 0.0
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss_pct", "reset_every_mb", "stall_every_mb", "stall_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"link fault {name!r} must be a finite number, got {v!r}")
            if v < 0:
                raise ConfigError(f"link fault {name!r} must be >= 0 (0: never), got {v!r}")
        if self.loss_pct >= 50:
            raise ConfigError(f"link fault 'loss_pct' must be below 50, got {self.loss_pct!r}")
        if (self.stall_every_mb > 0) != (self.stall_s > 0):
            raise ConfigError("link faults 'stall_every_mb' and 'stall_s' go together: set both")

    @property
    def active(self) -> bool:
        return bool(self.loss_pct or self.reset_every_mb or self.stall_every_mb)


@dataclass(frozen=True)
class Carried:
    """What the link did with one batch: the bytes that crossed it, and whether it reset."""

    wire_bytes: int
    reset: bool = False
    why: str = ""


class FaultyLink:
    """One device's link with :class:`LinkFaults`, its draws seeded by ``seed``.

    ``stall_timeout_s``: the client's stall timeout (a stall as long is a cut stream);
    ``pause(seconds)``: how a shorter stall holds the stream (default: not at all).
    Counters: ``bytes`` (all that crossed), ``retransmitted_bytes``, ``lost_segments``,
    ``resets``, ``stalls``.
    """

    def __init__(
        self,
        faults: LinkFaults,
        seed: int = 0,
        stall_timeout_s: float | None = None,
        pause: Callable[[float], None] | None = None,
    ) -> None:
        self.faults = faults
        self.rng = np.random.default_rng(seed)
        self.stall_timeout_s = stall_timeout_s
        self.pause = pause
        self.bytes = 0
        self.retransmitted_bytes = 0
        self.lost_segments = 0
        self.resets = 0
        self.stalls = 0
        self._since_reset = 0  # bytes on this connection
        self._since_stall = 0

    def _lost(self, nbytes: int) -> int:
        p = self.faults.loss_pct / 100
        if p <= 0 or nbytes <= 0:
            return 0
        return int(self.rng.binomial(math.ceil(nbytes / MSS), p))

    def carry(self, nbytes: int) -> Carried:
        """Send one batch of ``nbytes`` across the link (see the module docstring)."""
        f = self.faults
        if f.reset_every_mb and self._since_reset + nbytes > f.reset_every_mb * MB:
            part = max(0, int(f.reset_every_mb * MB) - self._since_reset)  # up to the drop
            wire = part + self._lost(part) * MSS
            self._drop(wire)
            return Carried(wire, True, f"connection reset after {self._total_mb():.2f} MB")
        lost = self._lost(nbytes)
        wire = nbytes + lost * MSS
        self.lost_segments += lost
        self.retransmitted_bytes += lost * MSS
        self.bytes += wire
        self._since_reset += nbytes
        self._since_stall += nbytes
        if f.stall_every_mb and self._since_stall >= f.stall_every_mb * MB:
            self._since_stall = 0
            self.stalls += 1
            if self.stall_timeout_s is not None and f.stall_s >= self.stall_timeout_s:
                # the client's stall guard cuts the stream: this batch is sent again
                self.retransmitted_bytes += nbytes
                self.resets += 1
                self._since_reset = 0
                return Carried(0, True, f"stalled {f.stall_s:g} s")
            if self.pause is not None:
                self.pause(f.stall_s)
        return Carried(wire)

    def _drop(self, wire: int) -> None:
        self.bytes += wire
        self.retransmitted_bytes += wire  # crossed for nothing: the batch comes again
        self.resets += 1
        self._since_reset = 0

    def _total_mb(self) -> float:
        return self.bytes / MB

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self.bytes,
            "retransmitted_bytes": self.retransmitted_bytes,
            "lost_segments": self.lost_segments,
            "resets": self.resets,
            "stalls": self.stalls,
        }


@contextmanager
def stall_guard(reader: Any, stall_s: float | None) -> Iterator[None]:
    """Cancel ``reader`` if the read in the block waits over ``stall_s`` seconds (None: never).

    The cancelled read is raised as :class:`flight.FlightTimedOutError` ("no batch for N s"),
    which callers treat as a cut stream: a stall, not the stream's length, ends a wait.
    """
    if stall_s is None:
        yield
        return
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        reader.cancel()

    timer = threading.Timer(stall_s, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except flight.FlightCancelledError as e:
        if fired.is_set():
            raise flight.FlightTimedOutError(f"no batch for {stall_s:g} s") from e
        raise
    finally:
        timer.cancel()
