"""The official SimMIM optimizer and per-step learning-rate schedule.

AdamW with two parameter groups: weight decay on weights, none on norms, biases (any 1-D parameter),
the mask token, relative-position tables, position embeddings and the cls token. The schedule is a
linear warmup from ``warmup_lr`` then cosine to ``min_lr`` (timm ``CosineLRScheduler`` with
``t_in_epochs=False`` as the official code uses it: the cosine runs over all steps, warmup included)
or a multistep decay, updated every optimizer step.
"""
from __future__ import annotations

import bisect
import math

import torch
import torch.nn as nn

NO_DECAY_KEYWORDS = ("mask_token", "relative_position_bias_table", "pos_embed", "cls_token")


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``[{decay}, {no decay}]``, with the official exclusions."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in NO_DECAY_KEYWORDS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay=weight_decay), lr=lr, betas=tuple(betas), eps=eps)


class WarmupScheduler:
    """Per-step learning rate: linear warmup, then ``"cosine"`` or ``"multistep"``.

    ``step_update(t)`` sets every group's ``lr`` for optimizer step ``t`` (0-based). Its state is
    the hyper-parameters only: the step counter lives in the training loop's checkpoint.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        warmup_lr: float,
        min_lr: float,
        total_steps: int,
        warmup_steps: int,
        kind: str = "cosine",
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
    ):
        if kind not in ("cosine", "multistep"):
            raise ValueError(f"scheduler: expected 'cosine' or 'multistep', got {kind!r}")
        if total_steps <= 0:
            raise ValueError(f"total_steps: expected a positive number of steps, got {total_steps}")
        self.optimizer = optimizer
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, warmup_lr, min_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.kind, self.milestones, self.gamma = kind, sorted(milestones), gamma

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if self.kind == "multistep":
            return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)
        if t >= self.total_steps:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.total_steps))

    def step_update(self, t: int) -> float:
        lr = self.lr_at(t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
