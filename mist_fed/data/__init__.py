"""Task registry: datasets as (id, label, RGB image) splits, by name (see :mod:`.registry`)."""

from mist_fed.data import synthetic as _synthetic  # noqa: F401  (registers `synthetic`)
from mist_fed.data.registry import (
    SPLITS,
    Task,
    TaskSplit,
    get_task,
    register_task,
    registered_tasks,
)

__all__ = ["SPLITS", "Task", "TaskSplit", "get_task", "register_task", "registered_tasks"]
