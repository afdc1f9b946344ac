"""Bandwidth shaping: a token bucket that paces a byte stream to a link's rate, plus latency.

:class:`LinkShaper` is what a client hands to the Flight client's ``on_batch(nbytes)`` hook: each
received record batch waits for its tokens, so the stream arrives no faster than the device's
downlink. ``time_scale`` > 1 runs the wait that many times faster than real time; the simulated
transfer time (real-time equivalent) and the bytes on the wire are always counted exactly.
Clock and sleep are injectable so tests can check the rate without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mist_fed.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TokenBucket:
    """``rate`` bytes per second (of simulated time), holding at most ``burst`` bytes of tokens."""

    rate: float
    burst: float
    time_scale: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _tokens: float = field(init=False)
    _last: float = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ConfigError(f"token bucket rate must be > 0 bytes/s, got {self.rate}")
        if not self.burst > 0:
            raise ConfigError(f"token bucket burst must be > 0 bytes, got {self.burst}")
        if not self.time_scale > 0:
            raise ConfigError(f"time_scale must be > 0, got {self.time_scale}")
        self._tokens = self.burst
        self._last = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(
            self.burst, self._tokens + (now - self._last) * self.rate * self.time_scale
        )
        self._last = now

    def consume(self, nbytes: int) -> float:
        """Block until ``nbytes`` may pass; returns the real seconds waited."""
        waited = 0.0
        remaining = float(nbytes)
        with self._lock:
            while remaining > 0:
                chunk = min(remaining, self.burst)
                self._refill()
                if self._tokens < chunk:
                    delay = (chunk - self._tokens) / (self.rate * self.time_scale)
                    self.sleep(delay)
                    waited += delay
                    self._refill()
                self._tokens -= chunk
                remaining -= chunk
        return waited


@dataclass
class LinkShaper:
    """Shapes one direction of a link: ``rate_mbps`` Mbit/s, ``latency_ms`` per request."""

    rate_mbps: float
    latency_ms: float = 0.0
    time_scale: float = 1.0
    burst_bytes: int = 64 * 1024
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    bytes: int = 0
    batches: int = 0
    requests: int = 0
    waited_s: float = 0.0
    paused_s: float = 0.0  # stalls of an unreliable link (simulated seconds)
    bucket: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ConfigError(f"latency must be >= 0 ms, got {self.latency_ms}")
        self.bucket = TokenBucket(
            self.rate_mbps * 1e6 / 8,
            self.burst_bytes,
            self.time_scale,
            clock=self.clock,
            sleep=self.sleep,
        )

    def on_request(self) -> None:
        """One round trip before a stream starts (a request, a retry or a resume)."""
        self.requests += 1
        delay = self.latency_ms / 1e3 / self.time_scale
        if delay > 0:
            self.sleep(delay)
            self.waited_s += delay

    def on_batch(self, nbytes: int) -> None:
        """A received record batch of ``nbytes``: wait for its tokens and count it."""
        self.bytes += nbytes
        self.batches += 1
        self.waited_s += self.bucket.consume(nbytes)

    def pause(self, seconds: float) -> None:
        """The link holds the stream for ``seconds`` (a stall): wait them, scaled."""
        self.paused_s += seconds
        delay = seconds / self.time_scale
        if delay > 0:
            self.sleep(delay)
            self.waited_s += delay

    @property
    def simulated_s(self) -> float:
        """Real-time-equivalent transfer time of what passed: latency per request + bytes/rate
        + stalls."""
        latency = self.requests * self.latency_ms / 1e3
        return latency + self.bytes * 8 / (self.rate_mbps * 1e6) + self.paused_s

    def stats(self) -> dict[str, float]:
        return {
            "bytes": self.bytes,
            "batches": self.batches,
            "requests": self.requests,
            "simulated_s": self.simulated_s,
            "waited_s": self.waited_s,
            "time_scale": self.time_scale,
        }
