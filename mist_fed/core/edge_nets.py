"""Edge networks: the LAE (low-rank attention edge network) and the baselines' edge heads.

LAE: ``M`` blocks of ``x = x + Up(Attn(LowRankQKV(LayerNorm(x))))``, then a final norm and a
linear head on the class token. Block functions are registered by name (``lae``, ``mlp``,
``dwconv``) for the paper's ablation; edge networks are registered by name and built with
:func:`create_edge_net`, like timm's ``create_model``.

Defaults (depth 4, QKV width 31, one head) give, for ViT-B/16 inputs ``[197, 768]``, 0.39M
trainable parameters in the blocks and 0.085 GMACs per image: the paper's Table 1 row is
0.38M and 0.09 GMACs (see ``mist-fed inspect``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mist_fed.errors import ConfigError
from mist_fed.registry import Registry

# -- activation recomputation ---------------------------------------------------------------


class _Recompute(torch.autograd.Function):
    """Run ``fn(x)`` without storing its activations; recompute them in the backward pass.

    A small stand-in for ``torch.utils.checkpoint`` (whose first call imports the compiler
    stack, ~150 MB of resident memory). ``fn`` must be deterministic (no dropout); the edge
    blocks are.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: nn.Module, *params: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        params = [p for p in ctx.fn.parameters() if p.requires_grad]
        with torch.enable_grad():
            y = ctx.fn(x)
        grads = torch.autograd.grad(y, [x, *params], grad, allow_unused=True)
        return (grads[0], None, *grads[1:])


def recompute(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with activations recomputed in backward (gradient checkpointing)."""
    params = [p for p in fn.parameters() if p.requires_grad]
    return _Recompute.apply(x, fn, *params)


# -- block functions ------------------------------------------------------------------------

BlockFactory = Callable[..., nn.Module]
_BLOCKS: Registry[BlockFactory] = Registry("edge block")


def register_edge_block(name: str) -> Callable[[BlockFactory], BlockFactory]:
    return _BLOCKS.register(name)


def edge_blocks() -> list[str]:
    return _BLOCKS.names()


class Attend(nn.Module):
    """``softmax(q k^T / sqrt(d)) v`` as a module, so MAC counters can see it (no parameters)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class LowRankAttentionBlock(nn.Module):
    """``x + Up(Attn(LowRankQKV(LayerNorm(x))))``; Up starts at zero so the block starts as identity."""

    def __init__(self, dim: int, qkv_dim: int = 31, heads: int = 1, **_: Any) -> None:
        super().__init__()
        if qkv_dim % heads:
            raise ConfigError(f"qkv_dim={qkv_dim} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * qkv_dim)
        self.up = nn.Linear(qkv_dim, dim)
        self.attend = Attend()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch ``Up(Attn(LowRankQKV(LayerNorm(x))))``."""
        b, t, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = self.attend(qkv[0], qkv[1], qkv[2])
        return self.up(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class MLPBlock(nn.Module):
    """Ablation: ``x + Up(GELU(Down(LayerNorm(x))))`` with hidden width ``2 * qkv_dim``."""

    def __init__(self, dim: int, qkv_dim: int = 31, **_: Any) -> None:
        super().__init__()
        hidden = 2 * qkv_dim
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


class DWConvBlock(nn.Module):
    """Ablation: ``x + Up(GELU(DWConv3x3(Down(LayerNorm(x)))))`` over the patch grid.

    Prefix tokens (class, registers) skip the convolution and pass through Down/Up only.
    """

    def __init__(
        self, dim: int, tokens: int, qkv_dim: int = 31, prefix_tokens: int = 1, **_: Any
    ) -> None:
        super().__init__()
        hidden = 2 * qkv_dim
        self.prefix = prefix_tokens
        self.grid = math.isqrt(tokens - prefix_tokens)
        if self.grid * self.grid != tokens - prefix_tokens:
            raise ConfigError(
                f"dwconv block needs a square patch grid; got {tokens - prefix_tokens} patches"
            )
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.norm(x))
        b, _, c = h.shape
        pre, patches = h[:, : self.prefix], h[:, self.prefix :]
        grid = patches.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        patches = self.conv(grid).flatten(2).transpose(1, 2)
        return x + self.up(F.gelu(torch.cat([pre, patches], dim=1)))


register_edge_block("lae")(LowRankAttentionBlock)
register_edge_block("mlp")(MLPBlock)
register_edge_block("dwconv")(DWConvBlock)


def create_edge_block(name: str, **kw: Any) -> nn.Module:
    return _BLOCKS.get(name)(**kw)


# -- edge networks --------------------------------------------------------------------------

NetFactory = Callable[..., nn.Module]
_NETS: Registry[NetFactory] = Registry("edge network")


def register_edge_net(name: str) -> Callable[[NetFactory], NetFactory]:
    return _NETS.register(name)


def edge_nets() -> list[str]:
    return _NETS.names()


def create_edge_net(name: str, **kw: Any) -> nn.Module:
    """Build a registered edge network (``lae``, ``linear``, ``gather_linear``, ``partial1``, ``side``)."""
    return _NETS.get(name)(**kw)


class LAE(nn.Module):
    """Input norm, ``depth`` edge blocks, final norm, linear head on the class token."""

    def __init__(
        self,
        dim: int,
        tokens: int,
        num_classes: int,
        depth: int = 4,
        qkv_dim: int = 31,
        heads: int = 1,
        block: str = "lae",
        prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ConfigError(f"LAE depth must be >= 0, got {depth}")
        self.input_norm = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(
            *[
                create_edge_block(
                    block,
                    dim=dim,
                    tokens=tokens,
                    qkv_dim=qkv_dim,
                    heads=heads,
                    prefix_tokens=prefix_tokens,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (timm's name)."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = recompute(blk, x)
        else:
            x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


@register_edge_net("lae")
def _lae(**kw: Any) -> nn.Module:
    return LAE(**kw)


@register_edge_net("gather_linear")
def _gather_linear(*, dim: int, num_classes: int, **_: Any) -> nn.Module:
    """Ablation ``Gather* + linear``: norm and linear head on the gathered class token."""
    return LAE(dim=dim, tokens=1, num_classes=num_classes, depth=0)


class LinearHead(nn.Module):
    """Linear probing: a linear classifier on the final normed class token ``[B, dim]``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@register_edge_net("linear")
def _linear(*, dim: int, num_classes: int, **_: Any) -> nn.Module:
    return LinearHead(dim, num_classes)


class _Attention(nn.Module):
    def __init__(self, dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class ViTBlock(nn.Module):
    """A pre-norm ViT block with timm's ``Block`` parameter names, in plain torch.

    Partial-1 trains a copy of the backbone's last block on the device; this rebuilds it from
    its state dict (shapes and keys say width, MLP size, biases and layer scale; the head count
    comes from the cloud's geometry), so the edge never imports timm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        qkv_bias: bool = True,
        layer_scale: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"ViT block width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, qkv_bias)
        self.attend = Attend()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, mlp_hidden)
        self.ls1 = _LayerScale(dim) if layer_scale else None
        self.ls2 = _LayerScale(dim) if layer_scale else None

    @classmethod
    def from_state(
        cls, state: Mapping[str, torch.Tensor], num_heads: int, prefix: str = ""
    ) -> ViTBlock:
        """The block whose shapes fit ``state`` (keys under ``prefix``), weights loaded."""
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            dim = own["attn.qkv.weight"].shape[1]
            block = cls(
                dim,
                num_heads,
                own["mlp.fc1.weight"].shape[0],
                qkv_bias="attn.qkv.bias" in own,
                layer_scale="ls1.gamma" in own,
            )
        except KeyError as e:
            raise ConfigError(f"no ViT block weights under {prefix!r} (missing {e})") from e
        block.load_state_dict(own)
        return block

    @staticmethod
    def _scaled(ls: _LayerScale | None, x: torch.Tensor) -> torch.Tensor:
        return x if ls is None else x * ls.gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        qkv = self.attn.qkv(h).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = self.attend(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self._scaled(self.ls1, self.attn.proj(a))
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x + self._scaled(self.ls2, h)


class PartialHead(nn.Module):
    """Partial-1: a trainable copy of the backbone's last block, its final norm, a new head."""

    def __init__(self, block: nn.Module, norm: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.block = copy.deepcopy(block).requires_grad_(True).train()
        self.norm = copy.deepcopy(norm).requires_grad_(True).train()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x))[:, 0])


@register_edge_net("partial1")
def _partial1(
    *,
    init: Mapping[str, torch.Tensor],
    num_heads: int,
    dim: int,
    num_classes: int,
    **_: Any,
) -> nn.Module:
    """Partial-1 from the backbone's pretrained last block and final norm (``init``)."""
    block = ViTBlock.from_state(init, num_heads, prefix="block.")
    if "norm.weight" not in init:
        raise ConfigError("Partial-1 needs the backbone's final norm (norm.weight) in its init")
    norm = nn.LayerNorm(dim, eps=1e-6)
    norm.load_state_dict({k[5:]: v for k, v in init.items() if k.startswith("norm.")})
    return PartialHead(block, norm, dim, num_classes)


class SideNet(nn.Module):
    """LAST-style side tuning on all block outputs ``[B, N+1, T, D]``.

    One low-rank attention block per level reads ``z_i`` and adds its output to a side
    stream that starts at the normed ``z_N``; a final norm and head read the class token.
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        num_classes: int,
        levels: int,
        qkv_dim: int = 31,
        heads: int = 1,
    ) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(dim)
        self.levels = nn.ModuleList(
            [LowRankAttentionBlock(dim, qkv_dim=qkv_dim, heads=heads) for _ in range(levels)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, zs: torch.Tensor) -> torch.Tensor:
        h = self.input_norm(zs[:, -1])
        for i, blk in enumerate(self.levels):
            assert isinstance(blk, LowRankAttentionBlock)
            h = h + blk.branch(zs[:, i])
        return self.head(self.norm(h)[:, 0])


@register_edge_net("side")
def _side(
    *,
    dim: int,
    tokens: int,
    num_classes: int,
    levels: int,
    qkv_dim: int = 31,
    heads: int = 1,
    **_: Any,
) -> nn.Module:
    return SideNet(dim, tokens, num_classes, levels, qkv_dim=qkv_dim, heads=heads)
