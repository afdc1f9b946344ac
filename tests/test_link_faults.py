"""An unreliable device link: loss resends bytes, resets drop the real stream and resume it from
its last complete batch, stalls hold or cut it; the features that arrive are exact."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.device.profiles import parse_profile
from mist_fed.errors import ConfigError
from mist_fed.fleet.runtime.session import RunSession
from mist_fed.fleet.spec import spec_from_dict
from mist_fed.fleet.storage import resolve
from mist_fed.fleet.transport import Reply
from mist_fed.fleet.worker import LocalTransport, run_device
from mist_fed.wire.flight import FeatureClient
from mist_fed.wire.link_faults import MB, MSS, FaultyLink, LinkFaults

TASK = "synthetic:train=96,val=8,test=8"
NOTE = "test"


def _profile(**faults: float) -> dict:
    fields = ("cores", "memory_mb", "downlink_mbps", "uplink_mbps", "latency_ms", "gflops")
    base = dict(name="lossy", cores=1, memory_mb=512, downlink_mbps=40.0, uplink_mbps=10.0)
    base |= dict(latency_ms=30.0, gflops=1.0)
    return {**base, **faults, "sources": {f: NOTE for f in (*fields, *faults)}}


def test_loss_resends_segments_and_counts_them_seeded() -> None:
    # Prepare: 2% loss over 2,000 segments' worth of batches, twice with one seed, once another
    def run(seed: int) -> FaultyLink:
        link = FaultyLink(LinkFaults(loss_pct=2.0), seed)
        for _ in range(100):
            assert not link.carry(20 * MSS).reset
        return link

    # Execute
    a, b, c = run(0), run(0), run(1)
    # Assert: about 2% of 2,000 segments resent (40 expected; binomial sd about 6), exactly
    # reproducible under one seed, and every resent segment on the byte count
    assert 15 <= a.lost_segments <= 70
    assert a.stats() == b.stats() and a.stats() != c.stats()
    assert a.bytes == 2000 * MSS + a.retransmitted_bytes == 2000 * MSS + a.lost_segments * MSS
    assert a.resets == a.stalls == 0


def test_a_reset_drops_the_batch_crossing_the_mark_and_counts_its_bytes() -> None:
    link = FaultyLink(LinkFaults(reset_every_mb=0.001), 0)  # a reset every 1,000 bytes
    assert not link.carry(600).reset
    cut = link.carry(600)  # crosses the mark at 1,000: 400 bytes crossed, then the drop
    assert cut.reset and cut.wire_bytes == 400 and "reset" in cut.why
    assert not link.carry(600).reset  # a fresh connection counts from zero
    assert link.bytes == 1600 and link.retransmitted_bytes == 400 and link.resets == 1


def test_stalls_pause_the_stream_or_cut_it_at_the_client_stall_timeout() -> None:
    paused: list[float] = []
    short = FaultyLink(LinkFaults(stall_every_mb=0.001, stall_s=2.0), 0, 5.0, paused.append)
    long = FaultyLink(LinkFaults(stall_every_mb=0.001, stall_s=9.0), 0, 5.0, paused.append)
    assert [short.carry(500).reset for _ in range(4)] == [False] * 4
    assert paused == [2.0, 2.0] and short.stalls == 2 and short.resets == 0
    cuts = [long.carry(500).reset for _ in range(4)]
    assert cuts == [False, True, False, True] and long.resets == 2 and paused == [2.0, 2.0]


@pytest.mark.parametrize(
    "bad",
    [{"loss_pct": 50.0}, {"loss_pct": -1.0}, {"stall_every_mb": 1.0}, {"reset_every_mb": "x"}],
)
def test_bad_link_faults_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        parse_profile(_profile(**bad))


def test_a_profile_names_its_link_faults_and_its_clock_pays_for_them() -> None:
    clean = parse_profile(_profile())
    lossy = parse_profile(_profile(loss_pct=2.0, reset_every_mb=20.0))
    with pytest.raises(ConfigError, match="sources"):
        parse_profile({**_profile(loss_pct=2.0), "sources": _profile()["sources"]})
    assert not clean.link_faults().active
    assert lossy.link_faults() == LinkFaults(loss_pct=2.0, reset_every_mb=20.0)
    # Mathis: 1448 B / 30 ms * sqrt(1.5 / 0.02) = 3.34 Mbit/s, below the 40 Mbit/s link
    assert lossy.downlink_mbps_under_loss() == pytest.approx(3.345, rel=1e-3)
    # 100 MB: 5 resets, each a round trip more
    want = 0.03 + 100 * MB * 8 / (lossy.downlink_mbps_under_loss() * 1e6) + 5 * 0.03
    assert lossy.downlink_seconds(100 * MB) == pytest.approx(want)
    assert lossy.downlink_seconds(100 * MB) > 10 * clean.downlink_seconds(100 * MB)


@pytest.mark.network
def test_a_lossy_resetting_stream_resumes_with_every_row_exact(tmp_path, tiny_backbone, caplog):
    # Prepare: batches of 4 rows (17 x 48 float32 each: 13 kB a batch); a reset every 40 kB, 2% loss
    cfg = ServeConfig(
        port=0, random_init=True, cache_dir=str(tmp_path), rows_per_batch=4, tasks=(TASK,)
    )
    faults = LinkFaults(loss_pct=2.0, reset_every_mb=0.04)
    with (
        running_cloud(cfg, backbone=tiny_backbone) as loc,
        caplog.at_level(logging.WARNING, logger="mist_fed.wire.flight"),
    ):
        with FeatureClient(loc) as clean:
            want = clean.get(TASK, "train", "mist", 2)
            clean_bytes = clean.last.bytes
        link = FaultyLink(faults, seed=3)
        seen: list[int] = []
        # Execute
        with FeatureClient(loc, link=link, backoff_s=0.01, on_batch=seen.append) as lossy:
            got = lossy.get(TASK, "train", "mist", 2)
            lossy_bytes = lossy.last.bytes
    # Assert: every row exact, in order, none twice
    assert got.ids == want.ids and got.labels.tolist() == want.labels.tolist()
    assert got.features.numpy().tobytes() == want.features.numpy().tobytes()
    # resets happened (clean bytes / 40 kB of them), each one resumed, and every byte that
    # crossed (resent segments, batches cut by a reset) is on the stream's count
    assert link.resets >= clean_bytes // 40_000 >= 2
    resumed = [r for r in caplog.records if "resuming" in r.getMessage()]
    assert len(resumed) == link.resets
    assert lossy_bytes == sum(seen) == link.bytes == clean_bytes + link.retransmitted_bytes
    assert link.lost_segments > 0 and link.retransmitted_bytes > link.lost_segments * MSS


# -- a fleet on a lossy link ---------------------------------------------------------------------
FLEET_TASK = "synthetic:classes=3,train=144,val=8,test=36"
LOSSY = """\
name = "rpi4-lossy"
cores = 1
memory_mb = 2048
downlink_mbps = 40.0
uplink_mbps = 10.0
latency_ms = 30.0
gflops = 3.0
loss_pct = 2.0
reset_every_mb = 0.02  # the issue's "a reset every 20 MB", scaled to this fleet's 49 kB a device
[sources]
cores = "test"
memory_mb = "test"
downlink_mbps = "test"
uplink_mbps = "test"
latency_ms = "test"
gflops = "test"
loss_pct = "test: 2% packet loss"
reset_every_mb = "test: 20 MB scaled down 1000x"
"""


class HashingTransport(LocalTransport):
    """The plain loop's transport that also hashes each device's cached feature files after
    its job (before the run's storage goes)."""

    def __init__(self, session: RunSession, digests: dict) -> None:
        super().__init__(session.source(), stop=session.stop.event)
        self.digests = digests

    def replies(self) -> Iterator[Reply]:
        while self._todo:
            job, state = self._todo.popleft()
            reply = run_device(job, state, self.source, self.root)
            files = (resolve(job.storage, self.root) / "features").glob("*.arrow")
            self.digests[job.device, job.round] = sorted(
                hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            )
            yield reply


@pytest.mark.slow
@pytest.mark.network
def test_a_fleet_on_a_lossy_resetting_link_completes_with_exact_features(
    tiny_backbone, tmp_path, monkeypatch, caplog
):
    # Prepare: one cloud; 6 devices, 2 rounds, once on a clean profile and once on a lossy one
    # (same seed: byte-identical features must train to identical models)
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    lossy = tmp_path / "rpi4-lossy.toml"
    lossy.write_text(LOSSY)
    clean = tmp_path / "rpi4-clean.toml"
    faulty = ("loss_pct", "reset_every_mb")
    clean.write_text("\n".join(ln for ln in LOSSY.splitlines() if not ln.startswith(faulty)))
    serve = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "store"),
                        rows_per_batch=8, tasks=(FLEET_TASK,))  # fmt: skip

    def run(profile: Path) -> tuple[list[dict], dict]:
        spec = spec_from_dict({
            "fleets": [{"task": FLEET_TASK, "devices": 6}], "profiles": str(profile),
            "rounds": 2, "train_per_device": 24, "test_per_device": 6, "local_epochs": 1,
            "batch_size": 8, "seed": 5,
        })  # fmt: skip
        digests: dict = {}
        with RunSession(spec, None, cloud=loc, sigint=False) as session:
            session.run_rounds(HashingTransport(session, digests))
        return session.records.devices, digests

    # Execute
    with running_cloud(serve, backbone=tiny_backbone) as loc:
        clean_rows, clean_files = run(clean)
        with caplog.at_level(logging.WARNING, logger="mist_fed.wire.flight"):
            lossy_rows, lossy_files = run(lossy)
    # Assert: every device-round ok; every device's cached features byte-identical to the clean
    # run's, so every accuracy and loss equal; resets resumed; resent bytes in bytes_down
    assert all(r["status"] == "ok" for r in clean_rows), [r["reason"] for r in clean_rows]
    ok = sum(r["status"] == "ok" for r in lossy_rows)
    assert ok == len(lossy_rows) == 12, [r["reason"] for r in lossy_rows]
    same_files = sum(lossy_files[k] == clean_files[k] and len(clean_files[k]) == 2
                     for k in clean_files)  # fmt: skip
    assert same_files == len(clean_files) == 12
    key = ("round", "device")

    def by(rows: list[dict]) -> dict:
        return {tuple(r[k] for k in key): r for r in rows}

    c, lo = by(clean_rows), by(lossy_rows)
    assert [(r["accuracy"], r["train_loss"]) for r in lo.values()] == [
        (c[k]["accuracy"], c[k]["train_loss"]) for k in lo
    ]
    resets = sum("link: connection reset" in r.getMessage() for r in caplog.records)
    extra = {k: lo[k]["bytes_down"] - c[k]["bytes_down"] for k in lo}
    assert resets >= 12  # 49 kB a device over a reset every 20 kB: 2 each, at least
    assert all(extra[k] > 0 for k in lo if k[0] == 1)  # round 1 streams the features
    assert all(extra[k] == 0 for k in lo if k[0] == 2)  # round 2 reads its cache
    assert all(lo[k]["transfer_s"] > c[k]["transfer_s"] for k in lo if k[0] == 1)
    paid = sum(c[k]["bytes_down"] for k in c)
    print(
        f"\nRELIABILITY lossy_link: devices=6 rounds=2 device_rounds_ok={ok}/{len(lossy_rows)} "
        f"resets_resumed={resets} feature_files_identical={same_files}/{len(clean_files)} "
        f"extra_bytes_down={sum(extra.values())} ({100 * sum(extra.values()) / paid:.1f}%)"
    )
