"""EdgeDevice's fast lane: an in-memory feature source, no server, no Ray."""

import dataclasses

import pytest
import torch

from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.trainer import TrainConfig
from tests.fakes import GEOMETRY, MemorySource

FAST = TrainConfig(epochs=4, lr=1e-2, micro_batch=0)
RPI4 = load_profile("rpi4")


def _device(source, tmp_path, **kw):
    return EdgeDevice(RPI4, source, tmp_path / "device", **kw)


def test_a_split_is_paid_once_and_read_from_the_cache_after(tmp_path):
    # Prepare: a first device fetches train and test
    src = MemorySource()
    with _device(src, tmp_path) as dev:
        torch.manual_seed(0)
        net = dev.new_net("mist", 3, 3)
        dev.train(net, dev.features("t", "train", "mist", 3, "float16"), FAST)
        acc = dev.evaluate(net, dev.features("t", "test", "mist", 3, "float16"))
    first = dev.report()
    streams = len(src.streams)
    # Execute: the same device again (a rerun), same seed
    with _device(src, tmp_path) as again:
        torch.manual_seed(0)
        net = again.new_net("mist", 3, 3)
        again.train(net, again.features("t", "train", "mist", 3, "float16"), FAST)
        acc2 = again.evaluate(net, again.features("t", "test", "mist", 3, "float16"))
    # Assert
    assert first.feature_bytes == src.bytes_received > 0
    assert first.images_down == 48 + 30 and first.requests == 2
    assert len(src.streams) == streams  # nothing asked of the cloud
    m = again.report()
    assert m.feature_bytes == m.bytes_down == m.images_down == m.transfer_s == 0
    assert acc2 == acc > 0.4  # the same training on the same bytes; chance is 1/3
    assert m.train_steps == first.train_steps == 4 * 2  # 48 rows, batch 32


def test_other_keys_are_other_files(tmp_path):
    src = MemorySource()
    with _device(src, tmp_path) as dev:
        a = dev.features("t", "train", "mist", 3, "float16")
        b = dev.features("t", "train", "mist", 2, "float16")
        c = dev.features("t", "train", "mist", 3, "int8")
        d = dev.features("t", "train", "mist", 3, "float16", ids=["train-0", "train-5"])
    assert len({a.path, b.path, c.path, d.path}) == 4
    assert len(d) == 2 and len(src.streams) == 4


def test_select_k_trains_every_candidate_and_keeps_the_best_on_val(tmp_path):
    src = MemorySource()
    with _device(src, tmp_path) as dev:
        sel = dev.select_k("t", "mist", "float16", 3, FAST)
    assert set(sel.val_acc) == set(GEOMETRY.candidate_ks) == {1, 2, 3}
    assert sel.val_acc[sel.k] == max(sel.val_acc.values())
    assert {s[1] for s in src.streams} == {"train", "val"}
    assert dev.report().edge_params == sum(p.numel() for p in sel.net.parameters())


def test_training_batches_are_shuffled_per_epoch_and_cover_every_labelled_row(tmp_path):
    src = MemorySource(rows={"train": 50}, batch_rows=7)
    with _device(src, tmp_path) as dev:
        split = dev.features("t", "train", "mist", 3, "float32")
    gen = torch.Generator().manual_seed(0)
    epochs = [list(split.batches(8, gen)) for _ in range(2)]
    for batches in epochs:
        assert [len(y) for _, y in batches] == [8] * 6 + [2]
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(
            i % 3 for i in range(50)
        )
    first = [y.tolist() for _, y in epochs[0]]
    assert first != [y.tolist() for _, y in epochs[1]]


def _rise(tmp_path, rows, name):
    """Peak RSS rise of training one epoch and evaluating on a cached split of ``rows``."""
    geometry = dataclasses.replace(GEOMETRY, num_tokens=65, embed_dim=192)
    src = MemorySource(rows={"train": rows, "test": rows}, geometry=geometry, batch_rows=64)
    storage = tmp_path / name
    with EdgeDevice(RPI4, src, storage) as dev:  # fetch into the cache
        dev.features("t", "train", "mist", 3, "float32")
        dev.features("t", "test", "mist", 3, "float32")
    with EdgeDevice(RPI4, src, storage) as dev:
        net = dev.new_net("mist", 3, 3)
        dev.train(
            net,
            dev.features("t", "train", "mist", 3, "float32"),
            dataclasses.replace(FAST, epochs=1),
        )
        dev.evaluate(net, dev.features("t", "test", "mist", 3, "float32"))
    return dev.report().peak_mem_mb, rows * 65 * 192 * 4 / 2**20


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_split(tmp_path):
    # Prepare: a warm-up run so one-off allocations (kernels, calibration) are not counted
    _rise(tmp_path, 200, "warm")
    # Execute
    small, _ = _rise(tmp_path, 200, "small")
    big, split_mb = _rise(tmp_path, 3000, "big")  # 143 MB of float32 features per split
    # Assert: reading batch by batch, the big split costs what the small one does
    assert split_mb > 140
    assert big < small + 25, (small, big)
    assert big < split_mb / 3


def test_a_truncated_or_corrupt_cache_file_is_fetched_again_never_trained_on(tmp_path):
    # Prepare
    src = MemorySource()
    with _device(src, tmp_path) as dev:
        path = dev.features("t", "train", "mist", 3, "float16").path
    size = path.stat().st_size
    # Execute 1: cut the file short
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with _device(src, tmp_path) as dev:
        split = dev.features("t", "train", "mist", 3, "float16")
    # Assert 1
    assert len(src.streams) == 2 and dev.report().feature_bytes > 0
    assert split.path.stat().st_size == size
    # Execute 2: flip bytes inside a stored batch (same size: only the CRC can tell)
    raw = bytearray(path.read_bytes())
    raw[size // 2 : size // 2 + 8] = bytes(255 - b for b in raw[size // 2 : size // 2 + 8])
    path.write_bytes(bytes(raw))
    with _device(src, tmp_path) as dev:
        dev.features("t", "train", "mist", 3, "float16")
    # Assert 2
    assert len(src.streams) == 3 and dev.report().feature_bytes > 0


def test_a_stream_cut_while_caching_leaves_no_file(tmp_path):
    src = MemorySource(batch_rows=8)
    src.break_after = 2
    with pytest.raises(ConnectionError), _device(src, tmp_path) as dev:
        dev.features("t", "train", "mist", 3, "float16")
    assert not list((tmp_path / "device" / "features").glob("*"))
    with _device(src, tmp_path) as dev:
        assert len(dev.features("t", "train", "mist", 3, "float16")) == 48


def test_best_k_is_the_one_rule_of_every_k_selection():
    from mist_fed.device.metrics import best_k
    from mist_fed.errors import ConfigError

    # Best validation accuracy wins; a tie goes to the smaller k; no candidate is an error
    assert best_k({1: 0.5, 2: 0.7, 4: 0.6}) == 2
    assert best_k({4: 0.7, 2: 0.7, 8: 0.1}) == 2
    assert best_k({None: 0.3}) is None
    with pytest.raises(ConfigError, match="at least one candidate"):
        best_k({})
