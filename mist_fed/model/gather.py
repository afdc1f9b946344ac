"""Gather functions: what the cloud computes from ONE backbone pass per image.

``z_0`` is the token embedding, ``z_i`` the output of block ``i`` (before the final norm);
all tokens, prefix tokens included.

* ``mist`` (Gather*): ``z_0 + z_1 + ... + z_k``, shape ``[tokens, dim]``.
* ``side``: ``[z_0, ..., z_N]`` stacked, shape ``[N+1, tokens, dim]`` (LST/LAST-style side tuning).
* ``final``: the final normed class token, shape ``[dim]`` (linear probing).
* ``block``: ``z_k`` alone, shape ``[tokens, dim]`` (Partial-1 uses ``k = N-1``).
* ``mistpool``: Gather* with the patch grid average-pooled ``POOL x POOL`` on the cloud (prefix
  tokens kept): about ``1/POOL**2`` of the tokens, hence of the bytes on the wire. Not in the
  paper: a wire compression measured beside it.

:func:`gather_many` serves several specs (e.g. every candidate ``k``) from one pass that
stops at the deepest block any of them needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mist_fed.errors import ConfigError
from mist_fed.model.backbone import Backbone
from mist_fed.registry import Registry

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


def feature_shape(backbone: Backbone, spec: GatherSpec) -> tuple[int, ...]:
    """Per-image shape of ``spec``'s feature for ``backbone``."""
    return spec.shape(
        backbone.num_blocks, backbone.num_tokens, backbone.embed_dim, backbone.num_prefix_tokens
    )


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


GatherFn = Callable[[Sequence[torch.Tensor], Backbone, int | None], torch.Tensor]
_GATHER_FNS: Registry[GatherFn] = Registry("gather")


def register_gather(name: str) -> Callable[[GatherFn], GatherFn]:
    return _GATHER_FNS.register(name)


@register_gather("mist")
def _gather_star(zs: Sequence[torch.Tensor], backbone: Backbone, k: int | None) -> torch.Tensor:
    assert k is not None
    out = zs[0].clone()
    for z in zs[1 : k + 1]:
        out += z
    return out


@register_gather("mistpool")
def _gather_star_pooled(
    zs: Sequence[torch.Tensor], backbone: Backbone, k: int | None
) -> torch.Tensor:
    out = _gather_star(zs, backbone, k)
    prefix = backbone.num_prefix_tokens
    pre, patches = out[:, :prefix], out[:, prefix:]
    b, p, d = patches.shape
    side = patch_grid(p)
    grid = patches.transpose(1, 2).reshape(b, d, side, side)
    pooled = F.avg_pool2d(grid, POOL, POOL, ceil_mode=True).flatten(2).transpose(1, 2)
    return torch.cat([pre, pooled], dim=1).contiguous()


@register_gather("side")
def _side(zs: Sequence[torch.Tensor], backbone: Backbone, k: int | None) -> torch.Tensor:
    return torch.stack(list(zs), dim=1)


@register_gather("final")
def _final(zs: Sequence[torch.Tensor], backbone: Backbone, k: int | None) -> torch.Tensor:
    return backbone.final_token(zs[-1])


@register_gather("block")
def _block(zs: Sequence[torch.Tensor], backbone: Backbone, k: int | None) -> torch.Tensor:
    assert k is not None
    return zs[k].clone()


def gather_many(
    backbone: Backbone, images: torch.Tensor, specs: Sequence[GatherSpec]
) -> dict[GatherSpec, torch.Tensor]:
    """Compute every spec from one backbone pass over ``images`` (``[B, 3, H, W]``)."""
    if not specs:
        return {}
    depth = max(s.depth(backbone.num_blocks) for s in specs)
    with torch.inference_mode():
        zs = list(backbone.iter_blocks(images, upto=depth))
        out: dict[GatherSpec, torch.Tensor] = {}
        for spec in specs:
            out[spec] = _GATHER_FNS.get(spec.kind)(zs, backbone, spec.k)
    return out


def gather(backbone: Backbone, images: torch.Tensor, spec: GatherSpec) -> torch.Tensor:
    """One spec, one pass."""
    return gather_many(backbone, images, [spec])[spec]
