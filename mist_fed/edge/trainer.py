"""The edge trainer: fit, evaluate and k selection over decoded :class:`FeatureSet` splits.

Pure functions: no network, no Flower, no Ray. Training is AdamW with a per-step cosine schedule
to zero (optional linear warm-up), batch 32. Memory levers that leave the math unchanged:

* features stay in their wire dtype (fp16 halves the resident set) and are cast to fp32 one
  micro-batch at a time;
* a batch is split into micro-batches whose gradients are accumulated (loss scaled by the
  micro-batch's share of the labelled rows, so the update equals the full-batch update);
* edge networks that support it (the LAE) recompute block activations in the backward pass.

Rows labelled ``-1`` (unknown) are ignored by the loss and by :func:`evaluate`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mist_fed.errors import ConfigError
from mist_fed.wire.features import FeatureSet

log = logging.getLogger(__name__)

# Linear heads like larger learning rates than the LAE (DESIGN.md, reference run).
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
    grad_checkpointing: bool = True
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


def _labelled(data: FeatureSet) -> torch.Tensor:
    return torch.nonzero(data.labels >= 0).flatten()


def cosine_lambda(total: int, warmup: int = 0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def fit(
    net: nn.Module, train: FeatureSet, cfg: TrainConfig, on_step: StepHook | None = None
) -> FitResult:
    """Train ``net`` on the labelled rows of ``train``; returns losses, steps and host seconds."""
    rows = _labelled(train)
    if len(rows) == 0:
        raise ConfigError("the training split has no labelled rows; check the task's labels")
    set_ckpt = getattr(net, "set_grad_checkpointing", None)
    if callable(set_ckpt):
        set_ckpt(cfg.grad_checkpointing)
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total, cfg.warmup_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.micro_batch or cfg.batch_size
    net.train()
    losses: list[float] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = rows[torch.randperm(len(rows), generator=gen)]
        epoch_loss = 0.0
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b : b + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for m in range(0, len(batch), micro):
                idx = batch[m : m + micro]
                x = train.features[idx].float()
                loss = F.cross_entropy(
                    net(x), train.labels[idx], label_smoothing=cfg.label_smoothing
                )
                share = len(idx) / len(batch)
                (loss * share).backward()
                batch_loss += float(loss.detach()) * share
                del x, loss
            opt.step()
            sched.step()
            step += 1
            epoch_loss += batch_loss * len(batch)
            if on_step is not None:
                on_step(step, batch_loss)
        losses.append(epoch_loss / len(rows))
        log.debug("epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    seconds = time.perf_counter() - start
    net.eval()
    return FitResult(losses, step, seconds, len(rows) * cfg.epochs)


@torch.no_grad()
def predict(net: nn.Module, features: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits for ``features`` (any float dtype), computed in fp32 batches."""
    net.eval()
    out = [net(features[i : i + batch_size].float()) for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def evaluate(net: nn.Module, data: FeatureSet, batch_size: int = 64) -> float:
    """Top-1 accuracy on the labelled rows of ``data``."""
    rows = _labelled(data)
    if len(rows) == 0:
        raise ConfigError("the evaluation split has no labelled rows")
    logits = predict(net, data.features[rows], batch_size)
    return float((logits.argmax(1) == data.labels[rows]).float().mean())


@dataclass
class KSelection:
    k: int | None
    val_acc: dict[int | None, float]  # validation accuracy per candidate k
    net: nn.Module  # the net trained at the chosen k
    fit: FitResult  # its training record
    fits: dict[int | None, FitResult] = field(default_factory=dict)

    @property
    def train_seconds(self) -> float:
        return sum(f.seconds for f in self.fits.values())


SplitsForK = Callable[[Any], tuple[FeatureSet, FeatureSet]]  # k -> (train, val)


def select_k(
    build_net: Callable[[], nn.Module],
    splits: Mapping[Any, tuple[FeatureSet, FeatureSet]] | SplitsForK,
    ks: Sequence[int | None],
    cfg: TrainConfig,
    on_step: StepHook | None = None,
) -> KSelection:
    """Train one net per candidate ``k`` and keep the best on validation (ties: smaller k).

    ``splits`` maps ``k`` to its ``(train, val)`` FeatureSets, or is a function fetching them
    (so a client need hold only one k's features at a time). Each net starts from the same
    seed. A method without k passes ``ks=[None]``: one fit, its validation accuracy recorded.
    """
    if not ks:
        raise ConfigError("select_k needs at least one candidate k")
    fetch: SplitsForK = splits.__getitem__ if isinstance(splits, Mapping) else splits
    best: tuple[float, int | None, nn.Module, FitResult] | None = None
    val_acc: dict[int | None, float] = {}
    fits: dict[int | None, FitResult] = {}
    for k in sorted(ks, key=lambda v: -1 if v is None else v):
        train, val = fetch(k)
        torch.manual_seed(cfg.seed)
        net = build_net()
        fits[k] = fit(net, train, cfg, on_step)
        val_acc[k] = evaluate(net, val)
        log.info("k=%s: val accuracy %.4f", k, val_acc[k])
        if best is None or val_acc[k] > best[0]:
            best = (val_acc[k], k, net, fits[k])
        del train, val
    assert best is not None
    return KSelection(k=best[1], val_acc=val_acc, net=best[2], fit=best[3], fits=fits)


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    """``cfg`` with the given fields replaced (ignoring ``None`` values, e.g. unset CLI flags)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
