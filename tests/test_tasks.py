"""Real-task registry: protocols, Fashion-MNIST idx files, image folders, offline failures."""

import gzip
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mist_fed.assets.defaults import DEBIAN_FASHION_MNIST
from mist_fed.data import get_task, registered_tasks, task_entry
from mist_fed.data import vision as vision_mod
from mist_fed.data.protocols import Source, apply_protocol
from mist_fed.errors import TaskError

REAL_TASKS = ["flowers102", "cifar100", "dtd", "pets", "svhn", "eurosat", "caltech101"]


def _source(n, classes, tag):
    return Source(
        [f"{tag}/{i}" for i in range(n)],
        [i % classes for i in range(n)],
        lambda i: Image.new("L", (8, 8), i % 256),
    )


def test_vtab1k_protocol_is_seeded_disjoint_and_sized():
    train, test = _source(3000, 10, "tr"), _source(50, 10, "te")
    a = apply_protocol(train, test, protocol="vtab-1k", seed=0)
    b = apply_protocol(train, test, protocol="vtab-1k", seed=0)
    c = apply_protocol(train, test, protocol="vtab-1k", seed=1)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (800, 200, 50)
    assert not set(a["train"].ids) & set(a["val"].ids)
    assert a["train"].ids == b["train"].ids and a["train"].ids != c["train"].ids
    assert a["train"].image(0).mode == "RGB"  # grey becomes RGB
    small = apply_protocol(_source(100, 4, "s"), test, protocol="vtab-1k")
    assert (len(small["train"]), len(small["val"])) == (80, 20)


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_few_shot_protocol_takes_k_per_class(shots):
    train, test = _source(500, 5, "tr"), _source(20, 5, "te")
    s = apply_protocol(train, test, protocol="few-shot", shots=shots, seed=3)
    assert Counter(s["train"].labels) == dict.fromkeys(range(5), shots)
    assert not set(s["train"].ids) & set(s["val"].ids)
    with pytest.raises(TaskError, match="shots"):
        apply_protocol(train, test, protocol="few-shot", shots=3)
    with pytest.raises(TaskError, match="unknown protocol"):
        apply_protocol(train, test, protocol="vtab-2k")


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_into_rgb_splits(tmp_path, monkeypatch):
    # Prepare: a tiny fake in Debian's layout (the real one may or may not be installed)
    rng = np.random.default_rng(0)
    for split, n in (("train", 1200), ("t10k", 30)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(vision_mod, "DEBIAN_FASHION_MNIST", tmp_path)
    # Execute
    task = get_task("fashion-mnist", seed=0)
    # Assert
    assert task.num_classes == 10 and task.classes[9] == "Ankle boot"
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [800, 200, 30]
    img = task.split("test").image(0)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert task.split("test").ids[0] == "fashion-mnist/test/000000"
    assert task_entry("fashion-mnist").availability().where == str(tmp_path)


def test_missing_dataset_offline_fails_fast_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("MIST_FED_DATA", str(tmp_path))
    monkeypatch.setenv("MIST_FED_OFFLINE", "1")
    assert set([*REAL_TASKS, "fashion-mnist", "mnist", "imagefolder"]) <= set(registered_tasks())
    with pytest.raises(TaskError, match=f"no data under {tmp_path}.*MIST_FED_DATA"):
        get_task("cifar100")
    avail = task_entry("svhn").availability()
    assert not avail.available and str(tmp_path) in avail.where and not avail.downloadable


def _make_folder(root, splits, classes=("cat", "dog"), n=6):
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (10, 12), 40 * c + i).save(root / split / name / f"{i}.png")


def test_imagefolder_with_and_without_val(tmp_path):
    _make_folder(tmp_path / "a", ("train", "test"))
    _make_folder(tmp_path / "b", ("train", "val", "test"))
    a = get_task(f"imagefolder:{tmp_path / 'a'}")
    b = get_task(f"imagefolder:{tmp_path / 'b'}")
    assert a.classes == ["cat", "dog"] and a.num_classes == 2
    assert len(a.split("train")) + len(a.split("val")) == 12  # val carved out of train
    assert len(b.split("train")) == 12 and b.split("val").ids[0] == "val/cat/0.png"
    assert b.split("test").image(0).mode == "RGB"
    with pytest.raises(TaskError, match="layout"):
        get_task(f"imagefolder:{tmp_path / 'missing'}")


def test_tasks_command_and_offline_defaults(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from mist_fed.assets.defaults import default_backbone, default_task
    from mist_fed.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no ViT-B/16 cached here
    monkeypatch.setenv("MIST_FED_OFFLINE", "1")
    assert default_backbone() == "dinov2_s14_imgfocus"
    assert default_task() == "fashion-mnist"
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and "cifar100" in out and "default task" in out


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (make install adds it on Debian as root)",
)
def test_real_fashion_mnist_from_debian():
    task = get_task("fashion-mnist")
    assert len(task.split("test")) == 10_000
    assert Counter(task.split("test").labels) == dict.fromkeys(range(10), 1000)
