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
from mist_fed.registry import Registry

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


@dataclass(frozen=True)
class Availability:
    """Whether a task's data is here: where it looked, and how to get it when it is not."""

    available: bool
    where: str
    how: str = ""
    downloadable: bool = False  # not here, but its download host is reachable


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: its factory and what is known before loading any data."""

    name: str
    factory: TaskFactory
    num_classes: int | None = None  # None: depends on the spec's argument (imagefolder, synthetic)
    splits: tuple[str, ...] = SPLITS
    locate: Callable[[], Availability] | None = None
    description: str = ""
    requires_arg: bool = False  # only usable as ``name:ARG`` (imagefolder:PATH)

    def availability(self) -> Availability:
        if self.locate is None:
            return Availability(True, "generated or given by the spec")
        return self.locate()


_TASKS: Registry[TaskEntry] = Registry("task", TaskError)


def register_task(
    name: str,
    *,
    num_classes: int | None = None,
    splits: tuple[str, ...] = SPLITS,
    locate: Callable[[], Availability] | None = None,
    description: str = "",
    requires_arg: bool = False,
) -> Callable[[TaskFactory], TaskFactory]:
    """Register ``factory(arg: str | None, **options) -> Task`` under ``name``.

    ``options`` are the protocol options (``protocol``, ``shots``, ``seed``, ``download``);
    ``locate`` tells, without loading, whether the data is here; ``requires_arg`` marks a task
    usable only as ``name:ARG`` (not a *named* task: servers offer it only when listed).
    """

    def deco(fn: TaskFactory) -> TaskFactory:
        entry = TaskEntry(name, fn, num_classes, splits, locate, description, requires_arg)
        _TASKS.add(name, entry)
        return fn

    return deco


def registered_tasks() -> list[str]:
    return _TASKS.names()


def named_tasks() -> list[str]:
    """Registered tasks usable by name alone (what a cloud offers by default)."""
    return [n for n in _TASKS.names() if not _TASKS.get(n).requires_arg]


def task_entry(name: str) -> TaskEntry:
    return _TASKS.get(name)


def get_task(spec: str, **options: Any) -> Task:
    """Build the task named by ``spec`` (``name`` or ``prefix:arg``).

    Options: ``protocol`` (``vtab-1k`` default, ``few-shot``, ``full``), ``shots`` (few-shot),
    ``seed`` (split seed, default 0), ``download`` (allow a download when online, default True).
    """
    name, _, arg = spec.partition(":")
    return _TASKS.get(name).factory(arg or None, **options)
