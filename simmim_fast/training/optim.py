"""The SimMIM optimizer and per-step learning-rate schedule, by the official or the clean rules.

AdamW with two parameter groups, ``[{decay}, {no decay}]``, and a linear warmup from ``warmup_lr``
then cosine to ``min_lr`` (timm ``CosineLRScheduler`` with ``t_in_epochs=False`` as the official
code uses it: the cosine runs over all steps, warmup included) or a multistep decay, updated every
optimizer step. ``recipe`` picks the rules (``models.presets.RECIPES``):

``"official"``: microsoft/SimMIM exactly (``optimizer.py``, ``lr_scheduler.py``, ``main_simmim.py``)
    - no decay on 1-D parameters, ``*.bias``, the model's ``no_weight_decay()`` names and names holding
      one of its ``no_weight_decay_keywords()``. The official ``SimMIM`` wrapper prefixes both sets with
      ``encoder.``, so the Swin keyword ``encoder.relative_position_bias_table`` matches no parameter
      (they are ``encoder.layers.i.blocks.j.attn.relative_position_bias_table``): the Swin tables ARE
      decayed; its names are ``encoder.absolute_pos_embed`` and ``encoder.mask_token``. SwinV2 (the
      microsoft/Swin-Transformer SimMIM code, same optimizer rules) has the keywords ``cpb_mlp``,
      ``logit_scale`` and ``relative_position_bias_table``, prefixed the same way: its CPB-MLP weights and
      ``logit_scale`` (3-D) ARE decayed in pretraining. The ViT has
      ``encoder.pos_embed`` and ``encoder.cls_token`` only, so its mask token and shared
      relative-position table are decayed too.
    - the lr lags one step: the schedule's constructor sets ``warmup_lr`` (``base_lr`` without
      warmup) for the first step, and ``lr_scheduler.step_update(epoch * num_steps + idx)`` runs after
      ``optimizer.step()``, so step ``t >= 1`` runs at ``lr(t - 1)``. ``idx`` counts micro-batches:
      with ``accum_steps = A`` the schedule is in micro-batches (warmup, total and milestones times
      ``A``) and step ``t`` runs at ``lr_micro(t * A - 1)``. (Exact when the micro-batches of an epoch
      are a multiple of ``A``, as the trainer's sampler makes them.) Arithmetic in timm's order.
``"clean"`` (the deliberate deviation; default of these functions)
    - no decay also on anything named ``mask_token``, ``relative_position_bias_table``, ``pos_embed``,
      ``cls_token``;
    - step ``t`` runs at ``lr(t)``.
"""
from __future__ import annotations

import bisect
import math

import torch
import torch.nn as nn

from ..models.presets import check_recipe

NO_DECAY_KEYWORDS = ("mask_token", "relative_position_bias_table", "pos_embed", "cls_token")


def official_no_decay_sets(model: nn.Module) -> tuple[set[str], set[str]]:
    """``(names, keywords)``: what the official model's ``no_weight_decay()`` / ``no_weight_decay_keywords()``
    give its optimizer, for our SimMIM model, a bare Swin / ViT encoder or a timm Swin / BEiT classifier.

    Raises ``TypeError`` for any other module (the official rules are defined for those only).
    """
    from timm.models.beit import Beit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    from ..models.simmim import SimMIM

    if isinstance(model, SimMIM):
        names, keywords = official_no_decay_sets(model.encoder)
        # official SimMIM.no_weight_decay(_keywords): {'encoder.' + i for i in self.encoder....()}
        return {"encoder." + n for n in names}, {"encoder." + k for k in keywords}
    if isinstance(model, SwinTransformer):
        # SwinTransformer: {'absolute_pos_embed'} / {'relative_position_bias_table'};
        # SwinTransformerForSimMIM adds 'mask_token' to the names
        names = {"absolute_pos_embed"} | ({"mask_token"} if hasattr(model, "mask_token") else set())
        return names, {"relative_position_bias_table"}
    if isinstance(model, SwinTransformerV2):
        # microsoft/Swin-Transformer SwinTransformerV2: {'absolute_pos_embed'} / {'cpb_mlp', 'logit_scale',
        # 'relative_position_bias_table'}; SwinTransformerV2ForSimMIM adds 'mask_token' to the names. Under the
        # SimMIM wrapper's 'encoder.' prefix the keywords match nothing: cpb_mlp.{0,2}.weight and logit_scale
        # (nH, 1, 1) ARE decayed in official SwinV2 pretraining; a bare fine-tuning model's are not.
        names = {"absolute_pos_embed"} | ({"mask_token"} if hasattr(model, "mask_token") else set())
        return names, {"cpb_mlp", "logit_scale", "relative_position_bias_table"}
    if isinstance(model, Beit):
        # VisionTransformer: {'pos_embed', 'cls_token'}, no keywords (VisionTransformerForSimMIM adds nothing)
        return {"pos_embed", "cls_token"}, set()
    raise TypeError(
        f"model: the official weight-decay rules are defined for the SimMIM model, a Swin, a SwinV2 or a BEiT-style "
        f"ViT (timm SwinTransformer / SwinTransformerV2 / Beit); got {type(model).__name__} (use recipe='clean')"
    )


def weight_decay_names(model: nn.Module, *, recipe: str = "clean") -> tuple[list[str], list[str]]:
    """``(decay, no_decay)`` parameter names (trainable ones, in ``named_parameters`` order) by ``recipe``."""
    check_recipe(recipe)
    if recipe == "official":
        skip, keywords = official_no_decay_sets(model)
    else:
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        keywords = NO_DECAY_KEYWORDS
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def param_groups(model: nn.Module, *, weight_decay: float, recipe: str = "clean") -> list[dict]:
    """Two AdamW groups: ``[{decay}, {no decay}]``, by the ``recipe``'s rules (see the module doc)."""
    decay, no_decay = weight_decay_names(model, recipe=recipe)
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]


#: AdamW implementations: ``auto`` = ``fused`` (one multi-tensor CUDA kernel per step) when every
#: parameter is a floating CUDA tensor, else ``foreach``; ``single`` is the per-parameter loop. Same
#: update rule, same state (``step``, ``exp_avg``, ``exp_avg_sq``): their checkpoints load into each
#: other (``training.optim_state``).
ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "single")


def adamw_implementation(params, implementation: str = "auto") -> str:
    """The AdamW implementation ``implementation`` resolves to for ``params`` (``fused``/``foreach``/``single``)."""
    if not isinstance(implementation, str) or implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {', '.join(ADAMW_IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    params = list(params)
    cuda = bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return "fused" if cuda else "foreach"


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    recipe: str = "clean",
    implementation: str = "auto",
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (build it after moving the model to its device: ``implementation``
    ``"auto"`` picks ``fused`` for CUDA parameters, ``foreach`` otherwise; see ``ADAMW_IMPLEMENTATIONS``)."""
    groups = param_groups(model, weight_decay=weight_decay, recipe=recipe)
    flags = adamw_flags((p for g in groups for p in g["params"]), implementation)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **flags)


def adamw_flags(params, implementation: str = "auto") -> dict:
    """``torch.optim.AdamW`` keyword arguments of :func:`adamw_implementation` (``fused=True`` / ``foreach=...``)."""
    impl = adamw_implementation(params, implementation)
    return {"fused": dict(fused=True), "foreach": dict(foreach=True), "single": dict(foreach=False)}[impl]


class WarmupScheduler:
    """Per-step learning rate: linear warmup, then ``"cosine"`` or ``"multistep"``.

    ``step_update(t)`` sets every group's ``lr`` for optimizer step ``t`` (0-based), called before
    the step: ``lr_at(t)`` (the schedule) with ``recipe="clean"``, the official lagging value
    ``lr_for_step(t)`` with ``recipe="official"`` (module doc; ``accum_steps`` matters there only).
    Its state is the hyper-parameters only: the step counter lives in the training loop's checkpoint.
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
        recipe: str = "clean",
        accum_steps: int = 1,
    ):
        if kind not in ("cosine", "multistep"):
            raise ValueError(f"scheduler: expected 'cosine' or 'multistep', got {kind!r}")
        if total_steps <= 0:
            raise ValueError(f"total_steps: expected a positive number of steps, got {total_steps}")
        check_recipe(recipe)
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps: expected an int >= 1, got {accum_steps!r}")
        self.optimizer = optimizer
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, warmup_lr, min_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.kind, self.milestones, self.gamma = kind, sorted(milestones), gamma
        self.recipe, self.accum_steps = recipe, accum_steps

    def lr_at(self, t: int) -> float:
        """The schedule's value at step ``t`` (what the clean recipe runs step ``t`` at)."""
        if t < self.warmup_steps:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if self.kind == "multistep":
            return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)
        if t >= self.total_steps:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.total_steps))

    def _official_value(self, u: int) -> float:
        """The official schedule at micro-batch update ``u``, in timm's arithmetic order."""
        a = self.accum_steps
        warmup, total = self.warmup_steps * a, self.total_steps * a
        if u < warmup:
            return self.warmup_lr + u * ((self.base_lr - self.warmup_lr) / warmup)
        if self.kind == "multistep":
            return self.base_lr * self.gamma ** bisect.bisect_right([m * a for m in self.milestones], u)
        if u // total >= 1:  # past the single cosine cycle
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * u / total))

    def lr_for_step(self, t: int) -> float:
        """The learning rate optimizer step ``t`` runs at under this scheduler's recipe."""
        if self.recipe == "clean":
            return self.lr_at(t)
        if t <= 0:  # set by the official scheduler's constructor
            return self.warmup_lr if self.warmup_steps else self.base_lr
        return self._official_value(t * self.accum_steps - 1)

    def step_update(self, t: int) -> float:
        lr = self.lr_for_step(t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
