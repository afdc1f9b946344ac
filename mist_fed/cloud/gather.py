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

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mist_fed.cloud.backbone import Backbone
from mist_fed.core.specs import (  # noqa: F401  (re-exported for the cloud's modules)
    DEPTH_GATHERS,
    GATHERS,
    POOL,
    GatherSpec,
    candidate_ks,
    patch_grid,
    pooled_grid,
)
from mist_fed.registry import Registry


def feature_shape(backbone: Backbone, spec: GatherSpec) -> tuple[int, ...]:
    """Per-image shape of ``spec``'s feature for ``backbone``."""
    return backbone.geometry.shape(spec)


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
    zs = backbone.blocks_upto(images, depth)  # float32, in the backbone's numerics
    with torch.inference_mode():
        out: dict[GatherSpec, torch.Tensor] = {}
        for spec in specs:
            out[spec] = _GATHER_FNS.get(spec.kind)(zs, backbone, spec.k)
    return out


def gather(backbone: Backbone, images: torch.Tensor, spec: GatherSpec) -> torch.Tensor:
    """One spec, one pass."""
    return gather_many(backbone, images, [spec])[spec]
