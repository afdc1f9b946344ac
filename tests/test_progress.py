"""The client says what it waits for: a slow cold split's rows ready / total and rate."""

from __future__ import annotations

import logging
import time

import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.server import FeatureServer
from mist_fed.wire import progress
from mist_fed.wire.flight import FeatureClient

pytestmark = pytest.mark.network

TASK = "synthetic:classes=2,train=40,val=2,test=2,size=16"


class SlowEmbed(FeatureServer):
    """Each batch of 4 rows embedded 0.1 s late: a slow cold split."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        columns = self.service.embedder.columns

        def slow(*args, **kwargs):
            time.sleep(0.1)
            return columns(*args, **kwargs)

        self.service.embedder.columns = slow


def test_progress_lines_appear_for_a_slow_cold_split(tiny_backbone, tmp_path, caplog, monkeypatch):
    # Prepare: a line at most every 0.25 s (30 s outside tests)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.25)
    config = ServeConfig(
        port=0, random_init=True, cache_dir=str(tmp_path), rows_per_batch=4, tasks=(TASK,)
    )
    # Execute
    with (
        caplog.at_level(logging.INFO, logger="mist_fed.wire.progress"),
        running_cloud(config, backbone=tiny_backbone, server_cls=SlowEmbed) as loc,
        FeatureClient(loc, progress=False) as client,
    ):
        start = time.monotonic()
        fs = client.get(TASK, "train", "mist", 2, "float16")
        took = time.monotonic() - start
    # Assert: lines name the rows ready of the total and a rate, spaced by the interval
    lines = [r.getMessage() for r in caplog.records if r.name == "mist_fed.wire.progress"]
    assert len(fs) == 40 and took >= 1.0
    assert len(lines) >= 3, lines
    assert len(lines) <= took / 0.25 + 2
    assert all("/40 rows ready" in line and "rows/s" in line for line in lines)
    assert "40/40 rows ready" in lines[-1] and "done" in lines[-1]


def test_no_progress_is_reported_unless_asked(tiny_backbone, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    config = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path), tasks=(TASK,))
    with (
        caplog.at_level(logging.INFO, logger="mist_fed.wire.progress"),
        running_cloud(config, backbone=tiny_backbone) as loc,
        FeatureClient(loc) as client,
    ):
        client.get(TASK, "val", "mist", 2, "float16")
    assert not [r for r in caplog.records if r.name == "mist_fed.wire.progress"]
