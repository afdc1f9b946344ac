"""A lean AdamW: the same update as ``torch.optim.AdamW``, without its import cost.

Constructing any ``torch.optim.Optimizer`` imports torch's compiler stack (~900 modules,
~155 MB of resident memory), more than the whole LAE training step needs on an edge device.
:class:`LeanAdamW` applies ``torch.optim.AdamW``'s exact update (decoupled weight decay,
bias-corrected moments, ``eps`` added after the square root), per parameter group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class ParamGroup:
    params: list[torch.Tensor]
    weight_decay: float = 0.0
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)


class LeanAdamW:
    """``torch.optim.AdamW(groups, lr, betas, eps)`` with a settable ``lr``."""

    def __init__(
        self,
        groups: Iterable[tuple[Iterable[torch.Tensor], float]],  # (params, weight_decay)
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.groups = [ParamGroup(list(ps), wd) for ps, wd in groups]
        for g in self.groups:
            g.exp_avg = [torch.zeros_like(p) for p in g.params]
            g.exp_avg_sq = [torch.zeros_like(p) for p in g.params]

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g.params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.steps
        bc2_sqrt = math.sqrt(1 - b2**self.steps)
        step_size = self.lr / bc1
        for g in self.groups:
            for p, m, v in zip(g.params, g.exp_avg, g.exp_avg_sq, strict=True):
                if p.grad is None:
                    continue
                grad = p.grad
                p.mul_(1 - self.lr * g.weight_decay)
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
                p.addcdiv_(m, denom, value=-step_size)
