"""Optimizer, learning-rate schedule and weight EMA of a training run.

Kept apart from the loop so that the schedule can be tested as a function of the step alone: a resumed
run recomputes the lr from (step, total_steps) and never needs a scheduler's saved state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dyhead_cli.recipe import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and per-level scales (every parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up from ``warmup_factor``, then step decay at fractions of the run, or cosine."""
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, step / max(1, total_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    drops = sum(step >= int(f * total_steps) for f in cfg.lr_steps)
    return warm * cfg.lr_gamma**drops


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm(parameters, max_norm: float) -> Tensor:
    """The total L2 norm of the gradients (a 0-dim tensor), clipped to ``max_norm`` when it is > 0.

    The norm is what tells a diverging step before ``optimizer.step()`` can write inf/NaN into the
    weights and the optimizer state.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class EMA:
    """Exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)
