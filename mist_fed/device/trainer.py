"""The edge trainer: fit, evaluate and k selection over streamed feature batches.

Pure functions: no network, no Flower, no Ray. The data is anything with ``labelled`` rows,
``batches(batch_size, generator)`` (one shuffled epoch) and ``eval_batches(batch_size)``: a
device's :class:`~mist_fed.device.cache.CachedSplit` (read from its file batch by batch, never
held) or an in-memory :class:`~mist_fed.wire.features.FeatureSet`. Training is AdamW
(:class:`~mist_fed.device.optim.LeanAdamW`, torch's update without its import cost) with a
per-step cosine schedule to zero (optional linear warm-up), batch 32. An optional
``extra_loss(net)`` is added to every step's loss (the fleet's FedProx proximal term). Memory
levers that leave the math unchanged:

* features stay in their wire-decoded dtype (fp16 halves the batch) and are cast to fp32 one
  micro-batch at a time;
* a batch is split into micro-batches whose gradients are accumulated (loss scaled by the
  micro-batch's share of the labelled rows, so the update equals the full-batch update);
* edge networks that support it (the LAE) can recompute block activations in the backward
  pass (``grad_checkpointing``; off by default: at micro-batch 8 it costs compute, not memory);
* :func:`mist_fed.device.memory.tune_allocator` (called by the client) stops glibc's heap from
  fragmenting under multi-MB activations.

Rows labelled ``-1`` (unknown) are ignored by the loss and by :func:`evaluate`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mist_fed.device.optim import LeanAdamW
from mist_fed.errors import ConfigError
from mist_fed.wire.features import Batch

log = logging.getLogger(__name__)

# Linear heads like larger learning rates than the LAE (1e-2..1e-1 against 1e-3..3e-3 in the
# reference run on DINOv2-S/14 Fashion-MNIST features).
METHOD_LR = {"linear": 3e-2, "gather_linear": 3e-2}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    seed: int = 0
    micro_batch: int = 8  # rows per forward/backward; 0 = the whole batch
    grad_checkpointing: bool = False  # at micro-batch 8 it saves little (see bench edge)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        checks: dict[str, bool] = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "micro_batch": self.micro_batch >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"invalid TrainConfig field(s) {', '.join(bad)}: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """From TOML or kebab-case run-config keys (``batch-size`` -> ``batch_size``)."""
        known = {f.name for f in fields(cls)}
        kw = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConfigError(
                f"unknown TrainConfig field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**kw)

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> TrainConfig:
        """Defaults with the method's learning rate (linear heads use a larger one)."""
        base: dict[str, Any] = {"lr": METHOD_LR.get(method, cls.lr)}
        return cls(**{**base, **overrides})


@dataclass
class FitResult:
    losses: list[float]  # mean training loss per epoch
    steps: int  # optimizer steps
    seconds: float  # host wall time of the training loop
    samples: int  # rows seen (epochs x labelled rows)
    extra: dict[str, Any] = field(default_factory=dict)


StepHook = Callable[[int, float], None]  # (step, loss) after each optimizer step
ExtraLoss = Callable[[nn.Module], torch.Tensor]  # a term added to each step's loss


class TrainData(Protocol):
    """What the trainer reads (see the module docstring)."""

    @property
    def labelled(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]: ...

    def eval_batches(self, batch_size: int = 64) -> Iterator[Batch]: ...


def cosine_lambda(total: int, warmup: int = 0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def fit(
    net: nn.Module,
    train: TrainData,
    cfg: TrainConfig,
    on_step: StepHook | None = None,
    extra_loss: ExtraLoss | None = None,
) -> FitResult:
    """Train ``net`` on the labelled rows of ``train``; returns losses, steps and host seconds."""
    n = train.labelled
    if n == 0:
        raise ConfigError("the training split has no labelled rows; check the task's labels")
    set_ckpt = getattr(net, "set_grad_checkpointing", None)
    if callable(set_ckpt):
        set_ckpt(cfg.grad_checkpointing)
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = LeanAdamW([(decay, cfg.weight_decay), (no_decay, 0.0)], lr=cfg.lr)
    per_epoch = math.ceil(n / cfg.batch_size)
    schedule = cosine_lambda(per_epoch * cfg.epochs, cfg.warmup_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.micro_batch or cfg.batch_size
    net.train()
    losses: list[float] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        epoch_loss = 0.0
        for x, y in train.batches(cfg.batch_size, gen):
            opt.zero_grad()
            opt.lr = cfg.lr * schedule(step)
            batch_loss = 0.0
            for m in range(0, len(y), micro):
                xb = x[m : m + micro].float()
                loss = F.cross_entropy(
                    net(xb), y[m : m + micro], label_smoothing=cfg.label_smoothing
                )
                share = len(xb) / len(y)
                (loss * share).backward()
                batch_loss += float(loss.detach()) * share
                del xb, loss
            if extra_loss is not None:
                term = extra_loss(net)
                term.backward()
                batch_loss += float(term.detach())
            opt.step()
            step += 1
            epoch_loss += batch_loss * len(y)
            if on_step is not None:
                on_step(step, batch_loss)
        losses.append(epoch_loss / n)
        log.debug("epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    seconds = time.perf_counter() - start
    net.eval()
    return FitResult(losses, step, seconds, n * cfg.epochs)


@torch.no_grad()
def predict(net: nn.Module, features: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits for ``features`` (any float dtype), computed in fp32 batches."""
    net.eval()
    out = [net(features[i : i + batch_size].float()) for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def evaluate(net: nn.Module, data: TrainData, batch_size: int = 64) -> float:
    """Top-1 accuracy on the labelled rows of ``data``, read batch by batch."""
    net.eval()
    correct = total = 0
    for x, y in data.eval_batches(batch_size):
        correct += int((net(x.float()).argmax(1) == y).sum())
        total += len(y)
    if total == 0:
        raise ConfigError("the evaluation split has no labelled rows")
    return correct / total


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    """``cfg`` with the given fields replaced (ignoring ``None`` values, e.g. unset CLI flags)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
