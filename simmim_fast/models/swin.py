"""Swin Transformer encoder for SimMIM, built on timm's ``SwinTransformer``.

The mask token replaces masked patch embeddings right after the patch embedding (official
``SwinTransformerForSimMIM``); the encoder returns the final-stage features in NHWC.

Window attention: every timm ``WindowAttention`` is swapped at construction for
:class:`~simmim_fast.models.window_attention.WindowAttention` with ``attn_backend`` (default
``"auto"``: on CUDA the fused Triton kernel when it supports the input, else xformers when it
dispatches, else SDPA, else math) and every block becomes a
:class:`~simmim_fast.models.swin_block.SwinBlock` (with the Triton kernel the block's roll, partition
and reverse disappear); ``attn_backend="timm"`` keeps timm's modules. Parameters and ``state_dict``
keys are timm's either way.

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
from .window_attention import BACKENDS as ATTN_BACKENDS
from .window_attention import swap_window_attention

ENCODER_ATTN_BACKENDS = ATTN_BACKENDS + ("timm",)


class SwinEncoderForSimMIM(SwinTransformer):
    """timm ``SwinTransformer`` with a SimMIM mask token; ``num_classes`` is always 0.

    ``attn_backend``: ``"auto" | "triton" | "xformers" | "sdpa" | "math"`` for our window attention, or
    ``"timm"`` to keep timm's ``WindowAttention``.
    """

    def __init__(self, *, ops_backend: str = "auto", attn_backend: str = "auto", **kwargs):
        if not isinstance(attn_backend, str) or attn_backend not in ENCODER_ATTN_BACKENDS:
            raise ValueError(f"attn_backend: expected one of {ENCODER_ATTN_BACKENDS}, got {attn_backend!r}")
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.ops_backend = ops_backend
        self.attn_backend = attn_backend
        if attn_backend != "timm":
            swap_window_attention(self, backend=attn_backend)
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
