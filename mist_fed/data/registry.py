"""The task registry: ``register_task("name")`` factories that build :class:`Task` objects.

A task spec is a registered name (``fashion-mnist``) or ``prefix:args`` (``synthetic:classes=4``,
``imagefolder:/data/birds``): the part before the first colon picks the factory, the rest is
passed to it as ``arg``. A task has ``train``, ``val`` and ``test`` splits; each split gives
stable string ids, integer labels and RGB PIL images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from mist_fed.errors import TaskError

SPLITS = ("train", "val", "test")


class TaskSplit(Protocol):
    """One split: ``ids[i]``, ``labels[i]`` and ``image(i)`` (an RGB PIL image)."""

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Sequence[int]: ...

    def image(self, i: int) -> Image.Image: ...

    def __len__(self) -> int: ...


@dataclass
class Task:
    name: str
    num_classes: int
    splits: dict[str, TaskSplit]
    classes: list[str] = field(default_factory=list)

    def split(self, name: str) -> TaskSplit:
        if name not in self.splits:
            raise TaskError(
                f"task {self.name!r} has no split {name!r}; it has {', '.join(self.splits)}"
            )
        return self.splits[name]


TaskFactory = Callable[..., Task]
_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register ``factory(arg: str | None, **options) -> Task`` under ``name``."""

    def deco(fn: TaskFactory) -> TaskFactory:
        _TASKS[name] = fn
        return fn

    return deco


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(spec: str, **options: Any) -> Task:
    """Build the task named by ``spec`` (``name`` or ``prefix:arg``)."""
    name, _, arg = spec.partition(":")
    if name not in _TASKS:
        raise TaskError(f"unknown task {spec!r}; registered: {', '.join(registered_tasks())}")
    return _TASKS[name](arg or None, **options)
