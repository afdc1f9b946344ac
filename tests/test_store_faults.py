"""The feature store under faults: damaged shards, killed writes, read-only dirs, a full disk."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pyarrow as pa
import pytest

from mist_fed.cloud.gather import GatherSpec
from mist_fed.cloud.store import SHARD_PREFIX, FeatureStore
from mist_fed.wire.codec import WireMeta, encode_arrays

SPEC = GatherSpec("mist", 2)
META = WireMeta("tiny", "w0", "mist", 2, "float32", (5, 4))


def _rows(n: int, seed: int) -> tuple[list[str], dict[str, pa.Array], np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, *META.shape)).astype(np.float32)
    return [f"h{seed}-{i}" for i in range(n)], encode_arrays(META, x), x


def _features(store: FeatureStore, hashes: list[str]) -> np.ndarray:
    locs = store.lookup(SPEC, "float32", hashes)
    assert all(loc is not None for loc in locs)
    col = store.columns(SPEC, "float32", [loc for loc in locs if loc is not None])["features"]
    return np.asarray(col.to_numpy_ndarray())


def _shards(store: FeatureStore) -> list:
    return sorted((store.root / f"{SPEC.label()}-float32").glob("*.arrow"))


def test_damaged_shards_are_skipped_with_a_warning_never_served(tmp_path, caplog):
    # Prepare: three good shards, then truncate one, flip a byte in another, add garbage
    store = FeatureStore(tmp_path, "w0")
    written = [_rows(4, seed) for seed in range(3)]
    for hashes, cols, _ in written:
        store.put(SPEC, "float32", hashes, cols)
    shards = _shards(store)
    assert len(shards) == 3 and all(p.name.startswith(SHARD_PREFIX) for p in shards)
    by_hash = {}
    for p in shards:
        first = pa.ipc.open_file(pa.memory_map(str(p))).read_all().column("hash")[0].as_py()
        by_hash[first.split("-")[0]] = p
    truncated, flipped, good = by_hash["h0"], by_hash["h1"], by_hash["h2"]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a bit flip inside the feature buffer: footer still intact
    flipped.write_bytes(bytes(raw))
    (truncated.parent / f"{SHARD_PREFIX}{'0' * 64}.arrow").write_bytes(b"garbage" * 100)
    (truncated.parent / ".half-written.tmp").write_bytes(data[:100])  # a killed writer's temp
    # Execute
    with caplog.at_level(logging.WARNING, logger="mist_fed.cloud.store"):
        reopened = FeatureStore(tmp_path, "w0")
        locs = reopened.lookup(SPEC, "float32", written[0][0] + written[1][0] + written[2][0])
    # Assert: only the good shard is served; the others are misses (recomputed by the embedder)
    assert locs[:8] == [None] * 8 and all(loc is not None for loc in locs[8:])
    np.testing.assert_array_equal(_features(reopened, written[2][0]), written[2][2])
    assert caplog.text.count("skipping damaged store shard") == 3
    assert "checksum mismatch" in caplog.text
    assert good.exists()


def test_a_full_disk_keeps_serving_from_memory_with_a_clear_error(tmp_path, caplog, monkeypatch):
    # Prepare: every fsync fails as on a full disk
    store = FeatureStore(tmp_path, "w0")
    hashes, cols, x = _rows(3, 0)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("mist_fed.cloud.store.os.fsync", full)
    # Execute
    with caplog.at_level(logging.ERROR, logger="mist_fed.cloud.store"):
        store.put(SPEC, "float32", hashes, cols)
        store.put(SPEC, "float32", ["other"], encode_arrays(META, x[:1]))
    # Assert
    np.testing.assert_array_equal(_features(store, hashes), x)
    assert not store.persistent
    assert "not writable" in caplog.text and "No space left" in caplog.text
    assert caplog.text.count("not writable") == 1  # said once, not per write
    part = store.root / f"{SPEC.label()}-float32"
    assert list(part.iterdir()) == []  # no temp file and no half shard left behind


def _make_read_only(root, monkeypatch) -> list:
    """chmod the tree read-only; as root (which ignores modes) make every write fail with EROFS."""
    if os.geteuid() != 0:
        dirs = [p for p in root.rglob("*") if p.is_dir()] + [root]
        for d in dirs:
            d.chmod(0o555)
        return dirs

    def erofs(*args: object, **kw: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("pathlib.Path.write_text", erofs)
    monkeypatch.setattr("mist_fed.cloud.store.open", erofs, raising=False)
    return []


def test_read_only_cache_dir_serves_from_memory_and_reads_what_is_there(
    tmp_path, caplog, monkeypatch
):
    # Prepare: a store written earlier, then the directory tree made read-only
    hashes, cols, x = _rows(3, 0)
    FeatureStore(tmp_path, "w0").put(SPEC, "float32", hashes, cols)
    dirs = _make_read_only(tmp_path, monkeypatch)
    try:
        # Execute
        with caplog.at_level(logging.ERROR, logger="mist_fed.cloud.store"):
            store = FeatureStore(tmp_path, "w0")
            old = _features(store, hashes)
            new_hashes, new_cols, new_x = _rows(2, 1)
            store.put(SPEC, "float32", new_hashes, new_cols)
            new = _features(store, new_hashes)
    finally:
        for d in dirs:
            d.chmod(0o755)
    # Assert
    np.testing.assert_array_equal(old, x)
    np.testing.assert_array_equal(new, new_x)
    assert not store.persistent and "not writable" in caplog.text


@pytest.mark.network
def test_server_with_an_unwritable_cache_dir_serves_from_memory(tiny_backbone, caplog):
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.runner import running_cloud
    from mist_fed.wire.flight import FeatureClient

    # Prepare: /proc refuses new directories, even to root
    cfg = ServeConfig(port=0, random_init=True, cache_dir="/proc/self/mist-fed-store")
    # Execute
    with caplog.at_level(logging.ERROR), running_cloud(cfg, backbone=tiny_backbone) as loc:
        client = FeatureClient(loc)
        first = client.get("synthetic", "val", "mist", 2)
        again = client.get("synthetic", "val", "mist", 2)
        stats = client.stats()
    # Assert
    assert "not writable" in caplog.text
    assert (first.features == again.features).all() and stats["cache_hits"] == len(first)
