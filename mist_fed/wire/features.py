"""FeatureSet: decoded features of one split, as the edge trains on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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

    def subset(self, index: torch.Tensor | list[int]) -> FeatureSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        return FeatureSet(
            [self.ids[i] for i in idx.tolist()],
            self.labels[idx],
            self.features[idx],
            dict(self.meta),
        )
