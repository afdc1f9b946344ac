"""FeatureSet: decoded features of one split, as the edge trains on them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # (features [b, *shape], labels [b])


@dataclass
class FeatureSet:
    """Rows in one order: ``ids[i]``, ``labels[i]`` (-1 where unknown), ``features[i]``."""

    ids: list[str]
    labels: torch.Tensor  # int64 [n]
    features: torch.Tensor  # [n, *shape], float32 or float16
    meta: dict[str, Any] = field(default_factory=dict)  # backbone, weights, gather, k, dtype

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.labels.shape != (n,) or self.features.shape[0] != n:
            raise ValueError(
                f"FeatureSet rows disagree: {n} ids, labels {tuple(self.labels.shape)}, "
                f"features {tuple(self.features.shape)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-row feature shape."""
        return tuple(self.features.shape[1:])

    @property
    def labelled(self) -> int:
        """Rows with a known label (``>= 0``): what training and evaluation use."""
        return int((self.labels >= 0).sum())

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of shuffled training batches over the labelled rows (held in memory)."""
        rows = torch.nonzero(self.labels >= 0).flatten()
        order = rows[torch.randperm(len(rows), generator=generator)]
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            yield self.features[idx], self.labels[idx]

    def eval_batches(self, batch_size: int = 64) -> Iterator[Batch]:
        """Labelled rows in order, at most ``batch_size`` at a time."""
        rows = torch.nonzero(self.labels >= 0).flatten()
        for b in range(0, len(rows), batch_size):
            idx = rows[b : b + batch_size]
            yield self.features[idx], self.labels[idx]

    def subset(self, index: torch.Tensor | list[int]) -> FeatureSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        return FeatureSet(
            [self.ids[i] for i in idx.tolist()],
            self.labels[idx],
            self.features[idx],
            dict(self.meta),
        )
