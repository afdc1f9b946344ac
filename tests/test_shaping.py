"""The token bucket holds its rate; the link shaper counts bytes and simulated time."""

import time

import pytest

from mist_fed.errors import ConfigError
from mist_fed.wire.shaping import LinkShaper, TokenBucket


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_bucket_holds_its_rate_on_a_fake_clock():
    # Prepare
    clk = FakeClock()
    bucket = TokenBucket(rate=1e6, burst=10_000, clock=clk, sleep=clk.sleep)
    # Execute: 200 batches of 25 kB, each larger than the burst
    for _ in range(200):
        bucket.consume(25_000)
    # Assert: the only free bytes are the initial burst
    assert (200 * 25_000 - 10_000) / clk.now == pytest.approx(1e6, rel=1e-6)


def test_time_scale_speeds_the_wait_not_the_accounting():
    # Prepare
    clk = FakeClock()
    shaper = LinkShaper(8.0, latency_ms=50, time_scale=10, clock=clk, sleep=clk.sleep)
    # Execute
    shaper.on_request()
    for _ in range(100):
        shaper.on_batch(100_000)
    # Assert: 10 MB at 1 MB/s is 10 s simulated, +50 ms latency; waited about a tenth of that
    assert shaper.bytes == 10_000_000 and shaper.requests == 1
    assert shaper.simulated_s == pytest.approx(10.05)
    assert clk.now / shaper.simulated_s == pytest.approx(0.1, rel=0.01)


def test_bucket_rate_on_the_real_clock_is_not_exceeded():
    # Prepare: 4 MB/s scaled 10x, 4 MB should take ~0.1 s
    shaper = LinkShaper(32.0, time_scale=10, burst_bytes=16_384)
    start = time.monotonic()
    # Execute
    for _ in range(64):
        shaper.on_batch(65_536)
    elapsed = time.monotonic() - start
    # Assert: a ratio, never faster than the rate (slower only if the host is busy)
    rate = (shaper.bytes - 16_384) / elapsed / 10
    assert rate / 4e6 <= 1.05


def test_bad_rates_are_refused():
    with pytest.raises(ConfigError, match="rate"):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ConfigError, match="time_scale"):
        LinkShaper(1.0, time_scale=0)
