"""Gather specs and backbone geometry: what the cloud computes, in which shape. No torch.

* :class:`GatherSpec`: one gather function (``mist``, ``mistpool``, ``side``, ``final``,
  ``block``) and its depth ``k``.
* :class:`Geometry`: the cloud backbone's description (depth, width, tokens, candidate ``k``),
  served by the cloud whatever the task, so an edge device sizes its network from it without
  building the backbone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mist_fed.errors import ConfigError

GATHERS = ("mist", "mistpool", "side", "final", "block")
DEPTH_GATHERS = ("mist", "mistpool", "block")  # the kinds that take a depth k
POOL = 2  # mistpool's pooling window and stride on the patch grid


@dataclass(frozen=True)
class GatherSpec:
    """One gather function and its depth ``k`` (``None`` for those that use every block)."""

    kind: str
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GATHERS:
            raise ConfigError(f"unknown gather {self.kind!r}; choose one of {', '.join(GATHERS)}")
        if self.kind in DEPTH_GATHERS and self.k is None:
            raise ConfigError(f"gather {self.kind!r} needs a depth k")
        if self.kind not in DEPTH_GATHERS and self.k is not None:
            raise ConfigError(f"gather {self.kind!r} always uses every block; do not give k")

    def depth(self, num_blocks: int) -> int:
        """How many blocks the cloud must run for this spec."""
        k = num_blocks if self.k is None else self.k
        if not 0 <= k <= num_blocks:
            raise ConfigError(f"k={k} is outside 0..{num_blocks}")
        return k

    def shape(self, num_blocks: int, tokens: int, dim: int, prefix: int = 1) -> tuple[int, ...]:
        """Per-image feature shape (``prefix``: class and register tokens among ``tokens``)."""
        if self.kind == "side":
            return (num_blocks + 1, tokens, dim)
        if self.kind == "final":
            return (dim,)
        if self.kind == "mistpool":
            return (prefix + pooled_grid(tokens - prefix) ** 2, dim)
        return (tokens, dim)

    def label(self) -> str:
        return self.kind if self.k is None else f"{self.kind}{self.k}"


def patch_grid(patches: int) -> int:
    """Side of the square patch grid; pooling needs one."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ConfigError(f"patch pooling needs a square patch grid; got {patches} patches")
    return side


def pooled_grid(patches: int) -> int:
    """Side of the grid after ``POOL x POOL`` average pooling (a partial last window is kept)."""
    return -(-patch_grid(patches) // POOL)


def candidate_ks(num_blocks: int) -> tuple[int, ...]:
    """The paper's candidate depths ``{N/3, 2N/3, N}`` (rounded, distinct, at least 1)."""
    ks = {max(1, round(num_blocks * f)) for f in (1 / 3, 2 / 3, 1.0)}
    return tuple(sorted(ks))


@dataclass(frozen=True)
class Geometry:
    """The cloud backbone as an edge device needs to know it (``stats()["geometry"]``)."""

    backbone: str  # name
    weights: str  # weights id: features from other weights are refused
    num_blocks: int
    embed_dim: int
    num_tokens: int  # prefix tokens included
    num_prefix_tokens: int = 1
    img_size: int = 224
    num_heads: int = 1  # attention heads per block (Partial-1 rebuilds the last block)
    # timm kwargs the backbone was built with (Partial-1 rebuilds its last block from them)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "embed_dim", "num_tokens", "img_size", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(
                    f"backbone geometry {name} must be >= 1, got {getattr(self, name)}"
                )

    def shape(self, spec: GatherSpec) -> tuple[int, ...]:
        """Per-image shape of ``spec``'s feature for this backbone."""
        return spec.shape(self.num_blocks, self.num_tokens, self.embed_dim, self.num_prefix_tokens)

    @property
    def candidate_ks(self) -> tuple[int, ...]:
        return candidate_ks(self.num_blocks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidate_ks"] = list(self.candidate_ks)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """From :meth:`to_dict` (or the cloud's stats); derived and unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        missing = sorted(
            n
            for n in ("backbone", "weights", "num_blocks", "embed_dim", "num_tokens")
            if n not in data
        )
        if missing:
            raise ConfigError(
                f"backbone geometry lacks {', '.join(missing)}; is the cloud a current "
                "`mist-fed cloud serve`?"
            )
        return cls(**{k: v for k, v in data.items() if k in names})
