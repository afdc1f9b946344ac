"""The feature store's size cap (LRU eviction, also under concurrent readers), lazy and
write-time verification, shards seen as soon as written, and re-embeds counted by the service."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from mist_fed.cloud import store as store_mod
from mist_fed.cloud.gather import GatherSpec
from mist_fed.cloud.store import SHARD_PREFIX, FeatureStore
from mist_fed.wire.codec import WireMeta, encode_arrays

SPEC = GatherSpec("mist", 2)
META = WireMeta("tiny", "w0", "mist", 2, "float32", (5, 4))
ROW_BYTES = 5 * 4 * 4


def _rows(n: int, seed: int) -> tuple[list[str], dict[str, pa.Array], np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, *META.shape)).astype(np.float32)
    return [f"h{seed}-{i}" for i in range(n)], encode_arrays(META, x), x


def _read(store: FeatureStore, hashes: list[str]) -> np.ndarray | None:
    locs = store.lookup(SPEC, "float32", hashes)
    if any(loc is None for loc in locs):
        return None
    col = store.columns(SPEC, "float32", [loc for loc in locs if loc is not None])["features"]
    return np.asarray(col.to_numpy_ndarray())


def _shard_bytes(tmp_path) -> int:
    probe = FeatureStore(tmp_path / "probe", "w0")
    probe.put(SPEC, "float32", *_rows(10, 0)[:2])
    return probe.nbytes


def test_cap_evicts_least_recently_used_shards(tmp_path):
    # Prepare: room for three shards of 10 rows
    size = _shard_bytes(tmp_path)
    store = FeatureStore(tmp_path / "s", "w0", max_bytes=3 * size + size // 2)
    written = [_rows(10, seed) for seed in range(3)]
    for hashes, cols, _ in written:
        store.put(SPEC, "float32", hashes, cols)
    assert _read(store, written[0][0]) is not None  # shard 0 used last: shard 1 is the LRU
    # Execute: a fourth shard goes over the cap
    hashes3, cols3, x3 = _rows(10, 3)
    store.put(SPEC, "float32", hashes3, cols3)
    # Assert: exactly the least recently used shard went, from disk and from the index
    assert _read(store, written[1][0]) is None
    for keep in (0, 2):
        np.testing.assert_array_equal(_read(store, written[keep][0]), written[keep][2])
    np.testing.assert_array_equal(_read(store, hashes3), x3)
    stats = store.stats()
    assert stats["evicted_shards"] == 1 and stats["shards"] == 3
    assert stats["bytes"] <= store.max_bytes
    assert len(list((store.root).glob(f"*/{SHARD_PREFIX}*.arrow"))) == 3
    # rows stored again after eviction are counted as such
    assert store.put(SPEC, "float32", written[1][0], written[1][1]) == 10


def test_last_use_survives_a_restart(tmp_path, monkeypatch, caplog):
    # Prepare: two shards; the older one used after the newer one was written
    monkeypatch.setattr(store_mod, "TOUCH_EVERY_S", 0.0)
    size = _shard_bytes(tmp_path)
    first = FeatureStore(tmp_path / "s", "w0")
    a, b = _rows(10, 0), _rows(10, 1)
    first.put(SPEC, "float32", a[0], a[1])
    time.sleep(0.05)
    first.put(SPEC, "float32", b[0], b[1])
    time.sleep(0.05)
    assert _read(first, a[0]) is not None  # a is now the most recently used
    # Execute: a new process opens the store with a cap that holds one shard
    with caplog.at_level(logging.WARNING, logger="mist_fed.cloud.store"):
        second = FeatureStore(tmp_path / "s", "w0", max_bytes=size + size // 2)
    # Assert: b, the least recently used, was evicted at start, and the operator told why
    assert "over its cap" in caplog.text
    assert _read(second, b[0]) is None
    np.testing.assert_array_equal(_read(second, a[0]), a[2])


def test_eviction_under_concurrent_readers_serves_only_correct_rows(tmp_path):
    # Prepare: a cap of four shards, written and read from many threads at once
    size = _shard_bytes(tmp_path)
    store = FeatureStore(tmp_path / "s", "w0", max_bytes=4 * size + size // 2)
    data = {seed: _rows(10, seed) for seed in range(24)}
    errors: list[str] = []
    served = [0]
    lock = threading.Lock()

    def writer(seeds: list[int]) -> None:
        for seed in seeds:
            hashes, cols, _ = data[seed]
            store.put(SPEC, "float32", hashes, cols)

    def reader(worker: int) -> None:
        rng = np.random.default_rng(worker)
        for _ in range(300):
            seed = int(rng.integers(0, 24))
            hashes, _, x = data[seed]
            locs = store.lookup(SPEC, "float32", hashes)
            found = [i for i, loc in enumerate(locs) if loc is not None]
            if not found:
                continue
            got = store.columns(SPEC, "float32", [locs[i] for i in found])["features"]
            if not np.array_equal(np.asarray(got.to_numpy_ndarray()), x[found]):
                errors.append(f"seed {seed}: wrong rows")
            with lock:
                served[0] += len(found)

    # Execute
    threads = [threading.Thread(target=writer, args=(list(range(i, 24, 3)),)) for i in range(3)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Assert: readers got only correct rows (never another shard's), and the cap held
    assert errors == [] and served[0] > 0
    stats = store.stats()
    assert stats["evicted_shards"] >= 20 and stats["bytes"] <= store.max_bytes


def test_shards_are_checked_lazily_on_first_use(tmp_path, monkeypatch):
    # Prepare: three shards on disk
    first = FeatureStore(tmp_path, "w0")
    written = [_rows(4, seed) for seed in range(3)]
    for hashes, cols, _ in written:
        first.put(SPEC, "float32", hashes, cols)
    checked: list[str] = []
    real = store_mod._check_name
    monkeypatch.setattr(
        store_mod, "_check_name", lambda path, buf: (checked.append(path.name), real(path, buf))
    )
    # Execute: open, then read one shard's rows twice
    store = FeatureStore(tmp_path, "w0")
    assert store.size(SPEC, "float32") == 12  # indexed without hashing any shard
    assert checked == []
    _read(store, written[1][0])
    _read(store, written[1][0])
    # Assert: only the shard read was checked, once
    assert len(checked) == 1


def test_a_write_that_reads_back_wrong_is_never_served_from_disk(tmp_path, monkeypatch, caplog):
    # Prepare: the disk flips a byte of every file on its way down
    real_fsync = os.fsync

    def flipping_fsync(fd: int) -> None:
        os.pwrite(fd, b"\xff", 200)
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", flipping_fsync)
    store = FeatureStore(tmp_path, "w0")
    hashes, cols, x = _rows(3, 0)
    # Execute
    with caplog.at_level(logging.ERROR, logger="mist_fed.cloud.store"):
        store.put(SPEC, "float32", hashes, cols)
    # Assert: kept in memory, correct; no shard under a shard's name on disk
    np.testing.assert_array_equal(_read(store, hashes), x)
    assert "read back wrong" in caplog.text and not store.persistent
    assert list(tmp_path.rglob(f"{SHARD_PREFIX}*.arrow")) == []


def test_a_shard_written_by_another_store_is_seen_at_once(tmp_path):
    # Prepare: a reader whose partition is already open (and scanned)
    reader = FeatureStore(tmp_path, "w0")
    assert reader.lookup(SPEC, "float32", ["h0-0"]) == [None]
    # Execute: another writer (a second process, say) adds a shard
    hashes, cols, x = _rows(5, 0)
    FeatureStore(tmp_path, "w0").put(SPEC, "float32", hashes, cols)
    # Assert
    np.testing.assert_array_equal(_read(reader, hashes), x)


@pytest.mark.network
def test_service_counts_re_embeds_under_a_tiny_cap(tiny_backbone, tmp_path):
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.runner import running_cloud
    from mist_fed.wire.flight import FeatureClient

    def twice(max_gb: float) -> dict:
        cfg = ServeConfig(
            port=0,
            random_init=True,
            cache_dir=str(tmp_path / str(max_gb)),
            rows_per_batch=4,
            max_gb=max_gb,
        )
        with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
            first = client.get("synthetic", "train", "final")
            again = client.get("synthetic", "train", "final")
            assert (first.features == again.features).all()
            return client.stats()

    roomy = twice(32.0)
    tight = twice(1e-6)  # 1 kB: every new shard evicts the ones before it
    assert roomy["images_reembedded"] == 0 and roomy["store"]["evicted_shards"] == 0
    assert roomy["images_embedded"] == 32
    assert tight["images_reembedded"] > 0 and tight["store"]["evicted_shards"] > 0
    assert tight["images_embedded"] == 32 + tight["images_reembedded"]
