"""BEiT-style ViT encoder for SimMIM, built on timm's ``Beit``.

As the official ``VisionTransformerForSimMIM``: mask token substituted after the patch embedding,
cls token prepended (and dropped at the end), one relative-position bias shared by all blocks, no
absolute position embedding, layer scale.

Shapes
    images   (B, 3, H, W)            normalised
    mask     (B, H/16, W/16) or any (B, h, w) grid dividing it (0/1)
    returns  (B, H/16, W/16, C)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch.utils.checkpoint import checkpoint

from ..ops import mask_token_fill


class ViTEncoderForSimMIM(Beit):
    """timm ``Beit`` with a SimMIM mask token; ``num_classes`` is always 0, no pooling."""

    def __init__(self, *, ops_backend: str = "auto", **kwargs):
        kwargs["num_classes"] = 0
        kwargs.setdefault("global_pool", "")
        super().__init__(**kwargs)
        self.ops_backend = ops_backend
        self.patch_size = self.patch_embed.patch_size[0]
        self.encoder_stride = self.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-0.02, b=0.02)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """images ``(B, 3, H, W)``, mask ``(B, h, w)`` -> features ``(B, H/16, W/16, C)``."""
        x = self.patch_embed(x)  # (B, L, C)
        B, L, C = x.shape
        h, w = self.grid_size
        x = mask_token_fill(x.view(B, h, w, C), mask, self.mask_token.view(-1), backend=self.ops_backend)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x.view(B, L, C)), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = self.norm(x)
        return x[:, 1:].reshape(B, h, w, C)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}
