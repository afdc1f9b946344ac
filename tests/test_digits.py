"""The ``digits`` task: scikit-learn's bundled 8x8 digits, split the same way on every machine."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from functools import cache

import numpy as np
import pytest

from mist_fed.data import digits as digits_mod
from mist_fed.data import get_task, registered_tasks, task_entry
from mist_fed.data.tasks import named_tasks
from mist_fed.errors import TaskError

# sha256 of the sorted ids, one per line: pinned so a change in the split (numpy's generator,
# scikit-learn's copy of the data, the hold-out rule) fails here, not in a results table.
PINNED = {
    "train": "308710334913f385373abf9287b5dc6cbe12db3cc1a730474c08af64bdca144d",
    "val": "80098fee99c2b1f062fc7674daa49fa72beecfc2b733297b62af67748920a2cb",
    "test": "c2427b8e4faf484fdd1c5bbec4b58d2e8a8c15c380f0c15bb18271e0764e206f",
}
TOTAL = 1797


def _digest(ids):
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


@pytest.fixture(scope="module")
def task():
    pytest.importorskip("sklearn")
    return get_task("digits")


def test_registered_named_and_available():
    assert "digits" in registered_tasks() and "digits" in named_tasks()
    entry = task_entry("digits")
    assert entry.num_classes == 10
    pytest.importorskip("sklearn")
    avail = entry.availability()
    assert avail.available and "scikit-learn" in avail.where


def test_split_sizes_and_stratified_test(task):
    sizes = {s: len(task.split(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 800, "val": 200, "test": 359}  # test: 20% of 1,797 per class
    pool = Counter(digits_mod.source().labels)
    assert sum(pool.values()) == TOTAL
    test = Counter(task.split("test").labels)
    for c, n in pool.items():
        assert test[c] == round(n * 0.2)  # stratified: each class holds out its own 20%
    for s in ("train", "val"):
        counts = Counter(task.split(s).labels)
        assert set(counts) == set(range(10))
        for c, n in counts.items():  # about its share (10%), drawn at random from the rest
            assert abs(n / len(task.split(s)) - pool[c] / TOTAL) < 0.05, (s, c, n)


def test_splits_are_disjoint_and_pinned(task):
    ids = {s: task.split(s).ids for s in ("train", "val", "test")}
    for v in ids.values():
        assert len(set(v)) == len(v)
        assert all(i.startswith("digits-") and isinstance(i, str) for i in v)
    assert not set(ids["train"]) & set(ids["val"])
    assert not (set(ids["train"]) | set(ids["val"])) & set(ids["test"])
    assert {s: _digest(v) for s, v in ids.items()} == PINNED


def test_deterministic_and_seed_redraws_only_train_val(task):
    again = get_task("digits")
    other = get_task("digits", seed=1)
    for s in ("train", "val", "test"):
        assert again.split(s).ids == task.split(s).ids
        assert again.split(s).labels == task.split(s).labels
    assert other.split("test").ids == task.split("test").ids  # the held-out test is fixed
    assert other.split("train").ids != task.split("train").ids


def test_images_are_8x8_rgb_scaled_to_0_255(task):
    from sklearn.datasets import load_digits

    raw = load_digits().images
    split = task.split("test")
    img = split.image(0)
    assert (img.mode, img.size) == ("RGB", (8, 8))
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and (arr[..., 0] == arr[..., 1]).all()
    index = int(split.ids[0].removeprefix("digits-"))
    assert (arr[..., 0] == np.round(raw[index] * 255 / 16)).all()
    both = np.stack([np.asarray(split.image(i)) for i in range(50)])
    assert both.min() == 0 and both.max() == 255


def test_labels_are_ints_0_to_9(task):
    for s in ("train", "val", "test"):
        labels = task.split(s).labels
        assert all(type(v) is int and 0 <= v < 10 for v in labels)
    assert task.classes == [str(c) for c in range(10)] and task.num_classes == 10


def test_unknown_split_and_argument_are_errors(task):
    with pytest.raises(TaskError, match="no split 'bogus'"):
        task.split("bogus")
    with pytest.raises(TaskError, match="takes no argument"):
        get_task("digits:extra")


def test_other_protocols_draw_from_the_non_test_pool(task):
    few = get_task("digits", protocol="few-shot", shots=2)
    assert Counter(few.split("train").labels) == dict.fromkeys(range(10), 2)
    full = get_task("digits", protocol="full")
    assert len(full.split("train")) + len(full.split("val")) == TOTAL - 359
    assert full.split("test").ids == task.split("test").ids


def test_without_scikit_learn_one_line_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    fresh = cache(digits_mod._pixels_and_labels.__wrapped__)
    monkeypatch.setattr(digits_mod, "_pixels_and_labels", fresh)
    avail = task_entry("digits").availability()
    assert not avail.available and avail.how == "pip install scikit-learn"
    with pytest.raises(TaskError, match="pip install scikit-learn") as err:
        get_task("digits")
    assert "\n" not in str(err.value)
