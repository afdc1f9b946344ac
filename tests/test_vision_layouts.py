"""Every registered torchvision task reads its data from torchvision's on-disk layout, offline.

Tiny fixtures (:mod:`tests.layouts`) stand in for the real datasets; the MD5 check of the
readers that have one is switched off for them, as torchvision's own tests do.
"""

from __future__ import annotations

import sys

import pytest

from mist_fed.data import get_task, task_entry
from mist_fed.data import vision as vision_mod
from mist_fed.errors import TaskError
from tests.layouts import LAYOUTS, make_cifar100, make_flowers102, skip_md5


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MIST_FED_DATA", str(tmp_path))
    monkeypatch.setenv("MIST_FED_OFFLINE", "1")
    monkeypatch.setattr(vision_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    skip_md5(monkeypatch)
    return tmp_path


def test_every_torchvision_task_has_a_layout_fixture():
    assert set(LAYOUTS) == set(vision_mod.SPECS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_task_reads_torchvision_layout(name, data_root):
    # Prepare
    counts = LAYOUTS[name](data_root)
    # Execute
    task = get_task(name)
    # Assert: vtab-1k draws train + val from the official train split (all of it, this small)
    spec = vision_mod.SPECS[name]
    total = sum(counts.values())
    sizes = {s: len(task.split(s)) for s in ("train", "val", "test")}
    if "all" in counts:  # no official test split: a fixed 20% is held out
        assert sum(sizes.values()) == total and sizes["test"] == round(total * 0.2)
    else:
        assert sizes["train"] + sizes["val"] == counts["train"] and sizes["test"] == counts["test"]
    assert task.num_classes == spec.num_classes and len(task.classes) == spec.num_classes
    split = task.split("test")
    assert split.image(0).mode == "RGB"
    assert all(0 <= y < spec.num_classes for y in split.labels)
    assert len(set(split.ids)) == len(split)
    assert task_entry(name).availability().available


def test_missing_reader_dependency_says_which_package(data_root, monkeypatch):
    # Prepare: flowers102 on disk, scipy not importable
    make_flowers102(data_root)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    # Execute / Assert
    with pytest.raises(TaskError, match=r"needs the Python package 'scipy.io'.*make install"):
        get_task("flowers102")
    avail = task_entry("flowers102").availability()
    assert not avail.available and "scipy" in avail.how


def test_unreadable_data_is_one_clear_error(data_root):
    # Prepare: cifar100 files present but not pickles
    make_cifar100(data_root)
    (data_root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    # Execute / Assert
    with pytest.raises(TaskError, match=r"cifar100.*unreadable.*remove it"):
        get_task("cifar100")


@pytest.mark.network
def test_flowers102_features_through_the_cloud(data_root, tiny_backbone, tmp_path):
    from mist_fed.cloud.config import ServeConfig
    from mist_fed.cloud.runner import running_cloud
    from mist_fed.wire.flight import FeatureClient

    # Prepare: the server's default task list (every registered named task)
    make_flowers102(data_root)
    cfg = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "store"))
    task = get_task("flowers102")
    # Execute
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
        fs = client.get("flowers102", "train", "mist", 2)
        offered = {d["task"] for d in client.list_sets()}
    # Assert
    assert list(fs.ids) == list(task.split("train").ids)
    assert fs.labels.tolist() == list(task.split("train").labels)
    assert fs.features.shape == (len(fs), tiny_backbone.num_tokens, tiny_backbone.embed_dim)
    assert "flowers102" in offered
