"""Task registry basics on the synthetic task."""

import pytest

from mist_fed.data import get_task, registered_tasks
from mist_fed.errors import TaskError


def test_synthetic_task_is_deterministic_and_rgb():
    a = get_task("synthetic:classes=3,train=6,val=3,test=3,size=16")
    b = get_task("synthetic:classes=3,train=6,val=3,test=3,size=16")
    tr = a.split("train")
    assert a.num_classes == 3 and len(tr) == 6
    assert list(tr.labels) == [0, 1, 2, 0, 1, 2]
    assert len(set(tr.ids)) == 6
    img = tr.image(4)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert img.tobytes() == b.split("train").image(4).tobytes()
    assert img.tobytes() != tr.image(1).tobytes()


def test_unknown_task_and_bad_options_are_clear():
    assert "synthetic" in registered_tasks()
    with pytest.raises(TaskError, match="unknown task"):
        get_task("imagenet-99k")
    with pytest.raises(TaskError, match="bad synthetic task option"):
        get_task("synthetic:classes=x")
    with pytest.raises(TaskError, match="no split"):
        get_task("synthetic").split("holdout")
