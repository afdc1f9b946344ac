"""Feature streams time out on a stall (no batch for ``stall_s``), never on their total length."""

from __future__ import annotations

import logging
import time

import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.server import FeatureServer
from mist_fed.data import get_task
from mist_fed.errors import CloudUnavailableError
from mist_fed.wire.flight import FeatureClient

pytestmark = pytest.mark.network

TASK = "synthetic"


class SlowServer(FeatureServer):
    """Sends every batch ``gap_s`` after the last; once, the batch at ``stall_at`` hangs."""

    gap_s = 0.3
    stall_at: int | None = None
    stall_s = 0.0
    stalls_left = 1

    def _stream(self, *args, **kw):
        for n, batch in enumerate(super()._stream(*args, **kw)):
            time.sleep(self.gap_s)
            if n == self.stall_at and type(self).stalls_left > 0:
                type(self).stalls_left -= 1
                time.sleep(self.stall_s)
            yield batch


def _serve(tmp_path, backbone, cls):
    cfg = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path), rows_per_batch=4)
    return running_cloud(cfg, backbone=backbone, server_cls=cls)


def test_a_long_healthy_stream_outlives_the_call_deadline_without_breaking(
    tmp_path, tiny_backbone, caplog
):
    # Prepare: 8 batches 0.3 s apart (about 2.4 s in all) against a 1 s call deadline
    class Slow(SlowServer):
        pass

    n = len(get_task(TASK).split("train"))
    # Execute
    with (
        _serve(tmp_path, tiny_backbone, Slow) as loc,
        caplog.at_level(logging.WARNING, logger="mist_fed.wire.flight"),
        FeatureClient(loc, timeout_s=1.0, stall_s=1.0) as client,
    ):
        with FeatureClient(loc, stall_s=None) as warm:  # the store filled: only the gaps remain
            warm.get(TASK, "train", "mist", 2)
        start = time.monotonic()
        fs = client.get(TASK, "train", "mist", 2)
        took = time.monotonic() - start
    # Assert
    assert len(fs) == n and took > 2.0
    assert "broke after" not in caplog.text


def test_a_stalled_stream_is_cut_and_resumed_without_losing_a_row(tmp_path, tiny_backbone, caplog):
    # Prepare: the 3rd batch hangs 3 s once; the client gives up on a stream after 0.5 s quiet
    class Stall(SlowServer):
        gap_s = 0.0
        stall_at = 2
        stall_s = 3.0
        stalls_left = 1

    split = get_task(TASK).split("train")
    # Execute
    with (
        _serve(tmp_path, tiny_backbone, Stall) as loc,
        caplog.at_level(logging.WARNING, logger="mist_fed.wire.flight"),
        FeatureClient(loc, stall_s=0.5, backoff_s=0.01) as client,
    ):
        fs = client.get(TASK, "train", "mist", 2)
    # Assert
    assert list(fs.ids) == list(split.ids)
    assert caplog.text.count("no batch for 0.5 s") == 1


def test_a_server_that_never_answers_ends_in_one_clear_error(tmp_path, tiny_backbone):
    class Hung(SlowServer):
        gap_s = 0.0
        stall_at = 0
        stall_s = 2.0
        stalls_left = 10

    with (
        _serve(tmp_path, tiny_backbone, Hung) as loc,
        FeatureClient(loc, stall_s=0.3, retries=1, backoff_s=0.01) as client,
        pytest.raises(CloudUnavailableError, match=r"no batch for 0.3 s"),
    ):
        client.get(TASK, "val", "mist", 2)


def test_a_long_upload_outlives_the_call_deadline(tmp_path, tiny_backbone):
    from PIL import Image

    from mist_fed.wire.codec import encode_png

    # Prepare: each uploaded batch answered 0.4 s late; 6 batches against a 1 s call deadline
    class SlowEmbed(FeatureServer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            columns = self.service.embedder.columns

            def slow(*args, **kwargs):
                time.sleep(0.4)
                return columns(*args, **kwargs)

            self.service.embedder.columns = slow

    images = [(f"img{i}", encode_png(Image.new("RGB", (8, 8), (i, 0, 0)))) for i in range(12)]
    # Execute
    with (
        _serve(tmp_path, tiny_backbone, SlowEmbed) as loc,
        FeatureClient(loc, timeout_s=1.0, stall_s=2.0, upload_batch=2) as client,
    ):
        start = time.monotonic()
        fs = client.embed(images, "mist", 2)
        took = time.monotonic() - start
    # Assert
    assert list(fs.ids) == [i for i, _ in images] and took > 2.0
