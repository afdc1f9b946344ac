"""A warm whose embedding runs elsewhere (an :class:`EmbedPool`): the service checks and writes
every row, whatever order the workers answer in, and the store ends up as a local warm's."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.ray_warm import EmbedWorker
from mist_fed.cloud.service import FeatureService, Warm
from mist_fed.core.specs import GatherSpec
from mist_fed.errors import ConfigError, WireError
from mist_fed.wire.request import FeatureRequest

TASK = "synthetic:classes=3,train=40,val=8,test=8"
PAIRS = [(GatherSpec("mist", 2), "float16"), (GatherSpec("final"), "int8")]


class ReversePool:
    """Runs the jobs in reverse, in-process, on the Ray pool's worker class (without Ray): a
    backbone rebuilt from the service's spec, numerics and runtime; the task loaded itself."""

    workers = 1

    def __init__(self, rows, tamper=False):
        self.rows, self.tamper = rows, tamper
        self.jobs = 0

    def run(self, jobs, embedder):
        bb = embedder.backbone
        worker = EmbedWorker(bb.spec, bb.numerics, bb.runtime, TASK, "train")
        assert worker.backbone.weights_id == bb.weights_id
        for job in reversed(list(jobs)):
            out = worker.embed([self.rows[i] for i in job.items], job.needed)
            if self.tamper:  # a worker that answers one row short
                out = {p: {n: c.slice(1) for n, c in cols.items()} for p, cols in out.items()}
            self.jobs += 1
            yield job, out


def _service(tmp_path, tiny_backbone, name):
    cfg = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / name), tasks=(TASK,))
    return FeatureService(cfg, tiny_backbone)


def _hashes(service, rows):
    split = service.task(TASK).split("train")
    return service.split_hashes(FeatureRequest(TASK, "train", "final"), split, rows)


def _stored(service, rows):
    hashes = _hashes(service, rows)
    out = {}
    for spec, dtype in PAIRS:
        locs = service.store.lookup(spec, dtype, hashes)
        assert all(loc is not None for loc in locs)
        out[(spec, dtype)] = service.store.columns(spec, dtype, locs)
    return out


def test_pool_warm_in_reverse_order_stores_what_a_local_warm_stores(tmp_path, tiny_backbone):
    # Prepare: two services on separate stores; two pairs from one pass per image
    local = _service(tmp_path, tiny_backbone, "local")
    pooled = _service(tmp_path, tiny_backbone, "pooled")
    rows = list(range(40))
    pool = ReversePool(rows)
    hashes = _hashes(pooled, rows)
    # Execute
    a = local.warm(Warm(TASK, "train", PAIRS))
    n = pooled.embedder.warm(PAIRS, hashes, lambda i: None, pool)
    # Assert: every image embedded once, by the pool; rows identical to the local warm's
    assert a["images_embedded"] == n == 40 and pool.jobs == 5  # forward batches of 8
    want, got = _stored(local, rows), _stored(pooled, rows)
    for pair in PAIRS:
        for name, col in want[pair].items():
            assert pa.concat_arrays([got[pair][name]]).equals(pa.concat_arrays([col])), name
    assert pooled.embedder.warm(PAIRS, hashes, lambda i: None, pool) == 0  # all stored now


def test_rows_a_worker_gets_wrong_are_refused(tmp_path, tiny_backbone):
    service = _service(tmp_path, tiny_backbone, "s")
    hashes = _hashes(service, list(range(8)))
    pool = ReversePool(list(range(8)), tamper=True)
    with pytest.raises(WireError, match="do not match"):
        service.embedder.warm(PAIRS, hashes, lambda i: None, pool)


def test_warm_workers_need_a_ray():
    with pytest.raises(ConfigError, match="needs a Ray"):
        ServeConfig(warm_workers=2)
    with pytest.raises(ConfigError, match=">= 0"):
        ServeConfig(warm_workers=-1, ray="local")
