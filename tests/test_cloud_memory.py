"""The cloud streams what it embeds: a cold split is embedded, stored and streamed batch by
batch, and what the service keeps (mapped shards, anonymous memory) does not grow with it."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.store import SHARD_PREFIX
from mist_fed.wire.flight import FeatureClient

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps"),
]


def _mapped_shards(root: Path) -> int:
    """Shard files of the store under ``root`` mapped into this process now."""
    names = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith(str(root)) and Path(path).name.startswith(SHARD_PREFIX):
            names.add(path)
    return len(names)


def _stream_cold(tiny_backbone, tmp_path: Path, rows: int) -> tuple[int, int, int]:
    """Stream a cold split of ``rows``: (most shards mapped at once, mapped after, written)."""
    store = tmp_path / f"store-{rows}"
    task = f"synthetic:classes=2,train={rows},val=2,test=2,size=16"
    config = ServeConfig(
        port=0,
        random_init=True,
        cache_dir=str(store),
        rows_per_batch=8,
        batch_size=8,
        tasks=(task,),
        runtime="torch",
    )
    most = 0
    with running_cloud(config, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
        s = client.stream(task, "train", "mist", 3, "float32")
        got = 0
        for batch in s.batches:
            got += batch.num_rows
            del batch
            most = max(most, _mapped_shards(store))
        assert got == rows
        gc.collect()
        after = _mapped_shards(store)
        written = client.stats()["store"]["shards"]
    return most, after, written


def test_a_cold_split_leaves_no_shard_mapped_whatever_its_size(tiny_backbone, tmp_path):
    # Execute: a small and an eight times larger cold split
    small = _stream_cold(tiny_backbone, tmp_path, 32)
    large = _stream_cold(tiny_backbone, tmp_path, 256)
    # Assert: the large split wrote 8x the shards (3 candidate k per chunk of 8 rows), yet the
    # service kept a chunk or two of shards mapped while streaming, and none afterwards
    assert large[2] == 8 * small[2] == 8 * 3 * 4
    assert large[0] <= 6 and small[0] <= 6
    assert large[1] == 0 and small[1] == 0
