"""Task registry: datasets as (id, label, RGB image) splits, by name (see :mod:`.registry`)."""

from mist_fed.data import digits as _digits  # noqa: F401  (registers `digits`)
from mist_fed.data import imagefolder as _imagefolder  # noqa: F401  (registers `imagefolder`)
from mist_fed.data import synthetic as _synthetic  # noqa: F401  (registers `synthetic`)
from mist_fed.data import vision as _vision  # noqa: F401  (registers the torchvision tasks)
from mist_fed.data.protocols import PROTOCOLS, SHOTS
from mist_fed.data.tasks import (
    SPLITS,
    Availability,
    Task,
    TaskEntry,
    TaskSplit,
    get_task,
    register_task,
    registered_tasks,
    task_entry,
)

__all__ = [
    "PROTOCOLS",
    "SHOTS",
    "SPLITS",
    "Availability",
    "Task",
    "TaskEntry",
    "TaskSplit",
    "get_task",
    "register_task",
    "registered_tasks",
    "task_entry",
]
