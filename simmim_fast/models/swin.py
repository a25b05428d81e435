"""Swin Transformer encoder for SimMIM, built on timm's ``SwinTransformer``.

The mask token replaces masked patch embeddings right after the patch embedding (official
``SwinTransformerForSimMIM``); the encoder returns the final-stage features in NHWC.

Shapes
    images   (B, 3, H, W)            normalised
    mask     (B, H/p, W/p) or any (B, h, w) grid dividing it (0/1)
    returns  (B, H/32, W/32, C_out)  C_out = embed_dim * 8
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer

from ..ops import mask_token_fill


class SwinEncoderForSimMIM(SwinTransformer):
    """timm ``SwinTransformer`` with a SimMIM mask token; ``num_classes`` is always 0."""

    def __init__(self, *, ops_backend: str = "auto", **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.ops_backend = ops_backend
        self.patch_size = self.patch_embed.patch_size[0]
        self.encoder_stride = self.patch_size * 2 ** (self.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """images ``(B, 3, H, W)``, mask ``(B, h, w)`` -> features ``(B, H/32, W/32, C)``."""
        x = self.patch_embed(x)  # (B, Hp, Wp, C)
        x = mask_token_fill(x, mask, self.mask_token.view(-1), backend=self.ops_backend)
        x = self.layers(x)
        return self.norm(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}
