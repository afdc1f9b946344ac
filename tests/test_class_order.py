"""Training order never follows the order a split is stored in (#22).

Most real datasets list their images class by class (image folders, Flowers102's index): the
cloud streams them so, and the device caches them so. Training must still see uniformly
shuffled batches: exactly those of a shuffle of the whole split held in memory.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mist_fed.core.specs import GatherSpec
from mist_fed.device.cache import CachedSplit, CacheKey, FeatureCache
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.trainer import TrainConfig
from mist_fed.wire.codec import WireMeta, decode, encode, feature_schema
from mist_fed.wire.features import FeatureSet
from tests.fakes import MemorySource

LAPTOP = load_profile("laptop")


def _grouped_split(tmp_path, rows=300, batch_rows=64) -> tuple[CachedSplit, FeatureSet]:
    """A 3-class split stored class by class, and the same rows decoded into memory."""
    src = MemorySource(rows={"train": rows}, batch_rows=batch_rows, grouped=True)
    with EdgeDevice(LAPTOP, src, tmp_path / "device") as dev:
        split = dev.features("t", "train", "mist", 3, "float16")
    _, stream = src.stream("t", "train", GatherSpec("mist", 3), "float16")
    return split, decode(list(stream))


def test_the_fixture_is_grouped_by_class(tmp_path):
    _, memory = _grouped_split(tmp_path)
    labels = memory.labels.tolist()
    assert labels == sorted(labels) and set(labels) == {0, 1, 2}


def test_streamed_batches_are_those_of_a_full_shuffle_in_memory(tmp_path):
    # Prepare
    split, memory = _grouped_split(tmp_path)
    streamed_gen, memory_gen = (torch.Generator().manual_seed(7) for _ in range(2))
    # Execute: three epochs of each, the generators carried across epochs as fit() does
    for _ in range(3):
        streamed = list(split.batches(32, streamed_gen))
        held = list(memory.batches(32, memory_gen))
        # Assert: the same rows, in the same order, with the same bytes
        assert len(streamed) == len(held) == 10
        for (xs, ys), (xm, ym) in zip(streamed, held, strict=True):
            assert torch.equal(ys, ym)
            assert torch.equal(xs, xm)


def test_every_batch_of_a_grouped_split_mixes_its_classes(tmp_path):
    split, _ = _grouped_split(tmp_path, batch_rows=100)  # one class per batch on the wire
    gen = torch.Generator().manual_seed(0)
    batches = list(split.batches(32, gen))
    # 100 rows a class: a batch of 32 misses a class with probability about 3 * (2/3)^32
    assert all(set(y.tolist()) == {0, 1, 2} for _, y in batches[:-1])
    seen = sorted(torch.cat([y for _, y in batches]).tolist())
    assert seen == [c for c in range(3) for _ in range(100)]  # every row once


def test_evaluation_reads_every_labelled_row_once_in_file_order(tmp_path):
    split, memory = _grouped_split(tmp_path, rows=50, batch_rows=7)
    got = list(split.eval_batches(16))
    assert [len(y) for _, y in got] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([y for _, y in got]), memory.labels)
    assert torch.equal(torch.cat([x for x, _ in got]), memory.features)


def _meta(dtype="float32"):
    return WireMeta("tiny", "random", "mist", 2, dtype, (4, 6))


def test_unlabelled_rows_are_stored_but_neither_trained_nor_scored(tmp_path):
    # Prepare: 10 rows, labels unknown for rows 2 and 7
    meta = _meta()
    labels = [None if i in (2, 7) else i % 2 for i in range(10)]
    batch = encode(meta, [f"r{i}" for i in range(10)], labels, np.ones((10, 4, 6), "float32"))
    cache = FeatureCache(tmp_path)
    key = CacheKey("tiny", "random", "t", "train", "mist", 2, "float32")
    # Execute
    split = cache.store(key, feature_schema(meta), iter([batch]))
    trained = torch.cat([y for _, y in split.batches(4, torch.Generator().manual_seed(0))])
    scored = torch.cat([y for _, y in split.eval_batches(3)])
    # Assert
    assert (split.rows, split.labelled, split.unlabelled) == (10, 8, (2, 7))
    assert sorted(trained.tolist()) == sorted(v for v in labels if v is not None)
    assert scored.tolist() == [v for v in labels if v is not None]
    assert cache.open(key).unlabelled == (2, 7)


def test_a_cache_file_of_the_previous_layout_is_rewritten_without_a_download(tmp_path):
    # Prepare: a file as the previous version stored it (the wire's batches, sidecar v1)
    from mist_fed.device.cache import _batch_crc

    meta = _meta("int8")
    rng = np.random.default_rng(0)
    batches = [
        encode(meta, [f"r{i}" for i in range(s, s + 5)], [i % 3 for i in range(s, s + 5)],
               rng.normal(size=(5, 4, 6)).astype("float32"))
        for s in range(0, 15, 5)
    ]  # fmt: skip
    key = CacheKey("tiny", "random", "t", "train", "mist", 2, "int8")
    cache = FeatureCache(tmp_path)
    path, side = cache._paths(key)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, feature_schema(meta)) as w:
        for b in batches:
            w.write_batch(b)
    info = {
        "version": 1, "key": key.digest(), "rows": 15, "labelled": 15, "max_label": 2,
        "paid_bytes": 1234, "file_bytes": path.stat().st_size,
        "crcs": [_batch_crc(b) for b in batches],
    }  # fmt: skip
    side.write_text(json.dumps(info))
    # Execute
    split = cache.open(key)
    # Assert: one row per stored batch now, the same rows, the bytes once paid kept
    assert split is not None
    assert (split.num_batches, split.rows, split.paid_bytes) == (15, 15, 1234)
    assert json.loads(side.read_text())["version"] == 2
    got = torch.cat([x for x, _ in split.eval_batches(4)])
    assert torch.equal(got, decode(batches).features)


# -- end to end: a real cloud serving class-grouped tasks from disk --------------------------

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def _image(label: int, i: int) -> Image.Image:
    rng = np.random.default_rng([label, i])
    pixels = np.clip(rng.normal(COLOURS[label], 60, (32, 32, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _image_folder(root, train=60, test=15):
    """``root/{train,test}/<class>/*.png``: classes grouped on disk, as image folders are."""
    for split, n in (("train", train), ("test", test)):
        for c in range(len(COLOURS)):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                _image(c, i + (0 if split == "train" else 1000)).save(
                    root / split / f"class{c}" / f"{i:03d}.png"
                )
    return f"imagefolder:{root}"


def _flowers_in_blocks(data_root, per_class=100):
    """Flowers102's layout whose label index lists the classes in blocks (as the real one
    does), train / val / test interleaved across each block."""
    from scipy.io import savemat

    base = data_root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels = np.repeat(np.arange(len(COLOURS)), per_class)
    for i, c in enumerate(labels, start=1):
        _image(int(c), i).save(base / "jpg" / f"image_{i:05d}.jpg")
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "imagelabels.mat", {"labels": labels + 1})  # 1-based
    keep = ids % 4
    savemat(base / "setid.mat", {"trnid": ids[keep < 2], "valid": ids[keep == 2],
                                 "tstid": ids[keep == 3]})  # fmt: skip
    return "flowers102"


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    import mist_fed.data.vision as vision_mod
    from tests.layouts import skip_md5

    monkeypatch.setenv("MIST_FED_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MIST_FED_OFFLINE", "1")
    monkeypatch.setattr(vision_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    skip_md5(monkeypatch)
    return tmp_path / "data"


@pytest.mark.network
@pytest.mark.parametrize("layout", ["imagefolder", "flowers102"])
@pytest.mark.parametrize("method", ["mist", "linear"])
def test_a_class_grouped_task_trains_as_a_shuffle_in_memory(
    layout, method, data_root, tiny_backbone, tmp_path
):
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.runner import running_cloud
    from mist_fed.data import get_task
    from mist_fed.device.source import FlightSource
    from mist_fed.wire.flight import FeatureClient

    # Prepare: the task on disk, grouped by class; a real cloud serving it
    if layout == "imagefolder":
        task = _image_folder(tmp_path / "folder")
    else:
        task = _flowers_in_blocks(data_root)
    labels = list(get_task(task).split("train").labels)
    assert labels == sorted(labels), "the fixture must list its classes in blocks"
    cfg = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "store"), tasks=(task,))
    train_cfg = TrainConfig.for_method(method, epochs=3, batch_size=8, seed=3)
    # Execute: the device streaming from its cache, then the whole split pulled into memory
    # and shuffled there (the reference), the same seeds
    with (
        running_cloud(cfg, backbone=tiny_backbone) as loc,
        EdgeDevice(LAPTOP, FlightSource(loc), tmp_path / "device") as dev,
    ):
        train = dev.features(task, "train", method, 2, "float32")
        test = dev.features(task, "test", method, 2, "float32")
        torch.manual_seed(0)
        streamed = dev.new_net(method, 3, 2)
        dev.train(streamed, train, train_cfg)
        streamed_acc = dev.evaluate(streamed, test)
        spec = dev.spec(method, 2)
        with FeatureClient(loc) as client:
            held = client.get(task, "train", spec.kind, spec.k)
        torch.manual_seed(0)
        reference = dev.new_net(method, 3, 2)
        dev.train(reference, held, train_cfg)
        reference_acc = dev.evaluate(reference, test)
    # Assert: the same training, hence the same net and accuracy
    assert held.labels.tolist() == labels  # the cloud streamed them class by class
    assert abs(streamed_acc - reference_acc) <= 0.01, (streamed_acc, reference_acc)
    for a, b in zip(streamed.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_writer_killed_mid_write_leaves_no_temp_file_behind(tmp_path):
    import subprocess
    import sys

    from mist_fed.device.cache import FeatureCache

    # Prepare: temp files of a writer that has exited, of a live process (pid 1) and of this one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    tmp_path.mkdir(exist_ok=True)
    orphan = tmp_path / f"abc.arrow.{int(dead.stdout)}.tmp"
    live = tmp_path / "abc.arrow.1.tmp"
    mine = tmp_path / f"abc.json.{os.getpid()}.tmp"
    for f in (orphan, live, mine):
        f.write_bytes(b"partial")
    # Execute
    FeatureCache(tmp_path)
    # Assert: only the dead writer's file is gone
    assert not orphan.exists() and live.exists() and mine.exists()
