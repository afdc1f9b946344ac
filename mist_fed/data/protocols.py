"""Split protocols: how a dataset's official splits become a task's train / val / test.

* ``vtab-1k`` (default): 800 train + 200 val drawn (seeded) from the training data, test is
  the official test split. Pools smaller than 1000 keep the same 4:1 ratio.
* ``few-shot``: ``shots`` (1, 2, 4, 8, 16) images per class for train, drawn (seeded) from the
  training data; val is the official val split when there is one, else another ``shots`` per
  class disjoint from train; test is the official test split.
* ``full``: all training data for train; val is the official val split, else a seeded 10%
  carved out of train; test is the official test split.

Every split is an :class:`IndexedSplit`: a view (indices) onto a :class:`Source`, so ids stay
the source image's id (``fashion-mnist/train/00042``) whatever protocol picked it: the cloud
computes each image's features once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mist_fed.errors import TaskError, one_of

PROTOCOLS = ("vtab-1k", "few-shot", "full")
SHOTS = (1, 2, 4, 8, 16)
VTAB_TRAIN, VTAB_VAL = 800, 200


@dataclass(frozen=True)
class Source:
    """One official split of a dataset: stable ids, labels and a loader of RGB images."""

    ids: Sequence[str]
    labels: Sequence[int]
    load: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class IndexedSplit:
    """A task split: the images ``indices`` of ``source`` (a :class:`~.registry.TaskSplit`)."""

    source: Source
    indices: tuple[int, ...]

    @property
    def ids(self) -> Sequence[str]:
        return [self.source.ids[i] for i in self.indices]

    @property
    def labels(self) -> Sequence[int]:
        return [int(self.source.labels[i]) for i in self.indices]

    def image(self, i: int) -> Image.Image:
        img = self.source.load(self.indices[i])
        return img if img.mode == "RGB" else img.convert("RGB")

    def __len__(self) -> int:
        return len(self.indices)


def whole(source: Source) -> IndexedSplit:
    return IndexedSplit(source, tuple(range(len(source))))


def _per_class(labels: np.ndarray, order: np.ndarray, shots: int, skip: set[int]) -> list[int]:
    taken: dict[int, int] = {}
    out: list[int] = []
    for i in order:
        i = int(i)
        if i in skip:
            continue
        c = int(labels[i])
        if taken.get(c, 0) < shots:
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return out


def apply_protocol(
    train: Source,
    test: Source,
    val: Source | None = None,
    *,
    protocol: str = "vtab-1k",
    shots: int | None = None,
    seed: int = 0,
) -> dict[str, IndexedSplit]:
    """The ``train`` / ``val`` / ``test`` splits of one protocol (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise TaskError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if (protocol == "few-shot") != (shots is not None):
        raise TaskError("give shots (1, 2, 4, 8 or 16) with protocol 'few-shot', and only then")
    if len(train) < 2:
        raise TaskError(f"the training data has {len(train)} images; need at least 2")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    if protocol == "vtab-1k":
        n = min(len(train), VTAB_TRAIN + VTAB_VAL)
        n_val = max(1, n * VTAB_VAL // (VTAB_TRAIN + VTAB_VAL))
        tr, va = order[: n - n_val], order[n - n_val : n]
        return {
            "train": IndexedSplit(train, tuple(sorted(int(i) for i in tr))),
            "val": IndexedSplit(train, tuple(sorted(int(i) for i in va))),
            "test": whole(test),
        }
    if protocol == "few-shot":
        assert shots is not None
        one_of("shots", shots, SHOTS, TaskError)
        labels = np.asarray(train.labels)
        tr_idx = _per_class(labels, order, shots, set())
        if val is not None:
            val_split = whole(val)
        else:
            val_split = IndexedSplit(
                train, tuple(sorted(_per_class(labels, order, shots, set(tr_idx))))
            )
        return {
            "train": IndexedSplit(train, tuple(sorted(tr_idx))),
            "val": val_split,
            "test": whole(test),
        }
    # full
    if val is not None:
        return {"train": whole(train), "val": whole(val), "test": whole(test)}
    n_val = max(1, len(train) // 10)
    return {
        "train": IndexedSplit(train, tuple(sorted(int(i) for i in order[n_val:]))),
        "val": IndexedSplit(train, tuple(sorted(int(i) for i in order[:n_val]))),
        "test": whole(test),
    }


def carve(
    source: Source, fraction: float, seed: int = 0, *, stratify: bool = False
) -> tuple[Source, Source]:
    """Split one source into (rest, held-out ``fraction``) with a fixed seed (no official test).

    ``stratify``: hold out ``fraction`` (rounded) of each class, so every class keeps its share
    in both parts; otherwise ``fraction`` of the whole, at random.
    """
    rng = np.random.default_rng(seed)
    if stratify:
        labels = np.asarray(source.labels)
        held: list[int] = []
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            held.extend(int(i) for i in members[: round(len(members) * fraction)])
    else:
        order = rng.permutation(len(source))
        held = [int(i) for i in order[: max(1, round(len(source) * fraction))]]
    out = sorted(held)
    taken = set(out)
    keep = [i for i in range(len(source)) if i not in taken]

    def sub(idx: list[int]) -> Source:
        return Source(
            ids=[source.ids[i] for i in idx],
            labels=[int(source.labels[i]) for i in idx],
            load=lambda j, idx=idx: source.load(idx[j]),  # type: ignore[misc]
        )

    return sub(keep), sub(out)
