"""Layer-wise learning-rate decay for fine-tuning, as the official SimMIM ``optimizer.py`` assigns it.

A network of ``L`` blocks has ``L + 2`` learning-rate levels; level ``i`` gets
``lr_scale = layer_decay ** (L + 1 - i)``:

- level 0: the patch embedding, mask token, cls token, absolute position embedding of a ViT;
- Swin: block ``b`` of stage ``s`` is level ``sum(depths[:s]) + b + 1``; the patch merging between
  stage ``s-1`` and ``s`` (timm: ``layers.s.downsample``, official: ``layers.{s-1}.downsample``) shares
  the level of the last block of stage ``s-1``, ``sum(depths[:s])``;
- SwinV2 (timm ``SwinTransformerV2``, same key layout): the same rule, as the official
  microsoft/Swin-Transformer ``get_swin_layer`` (``MODEL.SWINV2.DEPTHS``); a block's ``cpb_mlp`` and
  ``logit_scale`` are at the block's level;
- ViT: block ``i`` is level ``i + 1``; the shared relative-position bias is level ``L + 1``;
- level ``L + 1`` (scale 1): everything else (final norm, fc-norm, head).

(One deviation: a Swin absolute position embedding, unused by every official config, is put at level
0 like the ViT's; the official function would put it at the top level.)

Each level is split into a weight-decay group and a no-decay group: no decay on 1-D parameters
(norms, biases, layer scales), ``*.bias``, relative-position tables, position embeddings, cls and
mask tokens, and the model's ``no_weight_decay()`` names (timm's SwinV2: every ``cpb_mlp`` and ``logit_scale``
parameter, as the official SwinV2 fine-tuning keywords). (The official ViT fine-tuning code decays
its relative-position tables; we follow the pretraining rule and timm's ``no_weight_decay``, which
exclude them.)

``ScaledWarmupScheduler`` is the pretraining ``WarmupScheduler`` that multiplies each group's
learning rate by its ``lr_scale`` (timm's schedulers do the same).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch.nn as nn

from .optim import NO_DECAY_KEYWORDS, WarmupScheduler

__all__ = ["swin_layer_id", "vit_layer_id", "layer_decay_param_groups", "ScaledWarmupScheduler", "num_levels"]


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Learning-rate level of a Swin / SwinV2 parameter, timm key layout (``layers.s.downsample`` starts stage ``s``)."""
    top = sum(depths) + 1
    if name.startswith(("patch_embed", "mask_token", "absolute_pos_embed")):
        return 0
    m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
    if m:
        stage = int(m.group(1))
        if m.group(3) is not None:
            return sum(depths[:stage]) + int(m.group(3)) + 1
        return sum(depths[:stage])  # timm: merging at the start of `stage` = end of stage-1
    return top


def vit_layer_id(name: str, depth: int) -> int:
    """Learning-rate level of a BEiT-style ViT parameter."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return depth + 1
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def num_levels(model: nn.Module) -> int:
    """``L + 2`` for a timm Swin / SwinV2 (``L = sum(depths)``) or BEiT (``L = depth``)."""
    if hasattr(model, "layers"):
        return sum(len(stage.blocks) for stage in model.layers) + 2
    return len(model.blocks) + 2


def _layer_id_fn(model: nn.Module) -> Callable[[str], int]:
    if hasattr(model, "layers") and hasattr(model.layers[0], "blocks"):
        depths = [len(stage.blocks) for stage in model.layers]
        return lambda n: swin_layer_id(n, depths)
    if hasattr(model, "blocks"):
        depth = len(model.blocks)
        return lambda n: vit_layer_id(n, depth)
    raise TypeError(f"model: expected a timm SwinTransformer or Beit (with .layers or .blocks), got {type(model).__name__}")


def layer_decay_param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW parameter groups ``layer_<i>_<decay|no_decay>`` with ``lr = lr * lr_scale``.

    Groups appear in the order of the model's parameters, each ``{"group_name", "params", "weight_decay",
    "lr", "lr_scale", "layer_id"}``; frozen parameters are left out. ``layer_decay`` in ``(0, 1]``
    (1 disables the decay).
    """
    if not isinstance(layer_decay, (int, float)) or isinstance(layer_decay, bool) or not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay: expected a number in (0, 1], got {layer_decay!r}")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise ValueError(f"weight_decay: expected a non-negative number, got {weight_decay!r}")
    layer_id = _layer_id_fn(model)
    levels = num_levels(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in NO_DECAY_KEYWORDS)
        lid = layer_id(name)
        gname = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if gname not in groups:
            scale = float(layer_decay) ** (levels - 1 - lid)
            groups[gname] = {"group_name": gname, "params": [], "weight_decay": 0.0 if no_decay else float(weight_decay),
                             "lr": lr * scale, "lr_scale": scale, "layer_id": lid}
        groups[gname]["params"].append(p)
    return list(groups.values())


class ScaledWarmupScheduler(WarmupScheduler):
    """``WarmupScheduler`` whose ``step_update`` sets ``lr = schedule(t) * group["lr_scale"]`` (default 1)."""

    def step_update(self, t: int) -> float:
        lr = self.lr_at(t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr
