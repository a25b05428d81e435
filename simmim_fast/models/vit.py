"""BEiT-style ViT encoder for SimMIM, built on timm's ``Beit``.

As the official ``VisionTransformerForSimMIM``: mask token substituted after the patch embedding,
cls token prepended (and dropped at the end), one relative-position bias shared by all blocks, no
absolute position embedding, layer scale.

Initialisation (``init``): ``"clean"`` is timm's ``Beit`` init (Linear weights N(0, 0.02), not
truncated in effect; PyTorch's default patch-embedding init). ``"official"`` is the official one
(``official_init_``): ``VisionTransformerForSimMIM`` overrides ``_trunc_normal_`` with
``trunc_normal_(t, std=std, a=-std, b=std)``, and its base class calls that override for every
initialisation, so every Linear weight, the patch embedding (a Conv2d, bias 0), the cls token and the
mask token are N(0, 0.02) truncated at one standard deviation (std 0.02 * 0.5396 = 0.0108), then
``attn.proj`` / ``mlp.fc2`` of block ``i`` are divided by ``sqrt(2 * (i + 1))`` as in timm.

Shapes
    images   (B, 3, H, W)            normalised
    mask     (B, H/16, W/16) or any (B, h, w) grid dividing it (0/1)
    returns  (B, H/16, W/16, C)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch.utils.checkpoint import checkpoint

from ..ops import mask_token_fill

INITS = ("official", "clean")
OFFICIAL_STD = 0.02  # the official trunc_normal_ std; truncation at +-1 std


def _official_trunc_normal_(t: torch.Tensor) -> None:
    trunc_normal_(t, mean=0.0, std=OFFICIAL_STD, a=-OFFICIAL_STD, b=OFFICIAL_STD)


def _official_module_init(m: nn.Module) -> None:
    # the official VisionTransformer._init_weights, with its subclass's one-std truncation
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        _official_trunc_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@torch.no_grad()
def official_init_(encoder: "ViTEncoderForSimMIM") -> None:
    """Re-initialise ``encoder`` in place as the official ``VisionTransformerForSimMIM.__init__`` does.

    In the official order: position embedding (if any) and cls token, every Linear / Conv2d /
    LayerNorm (``self.apply``: children first), the ``fix_init_weight`` rescale of ``attn.proj`` and
    ``mlp.fc2`` by ``1 / sqrt(2 * (i + 1))``, then the mask token. What the official code leaves at its
    construction value keeps ours, which is the same: relative-position tables, q/v biases 0, layer
    scales ``init_values``.
    """
    if encoder.pos_embed is not None:
        _official_trunc_normal_(encoder.pos_embed)
    _official_trunc_normal_(encoder.cls_token)
    encoder.apply(_official_module_init)
    for i, blk in enumerate(encoder.blocks):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
    if getattr(encoder, "mask_token", None) is not None:
        _official_trunc_normal_(encoder.mask_token)


class ViTEncoderForSimMIM(Beit):
    """timm ``Beit`` with a SimMIM mask token; ``num_classes`` is always 0, no pooling.

    ``init``: ``"clean"`` (timm's initialisation) or ``"official"`` (``official_init_``).
    """

    def __init__(self, *, ops_backend: str = "auto", init: str = "clean", **kwargs):
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        kwargs["num_classes"] = 0
        kwargs.setdefault("global_pool", "")
        super().__init__(**kwargs)
        self.ops_backend = ops_backend
        self.patch_size = self.patch_embed.patch_size[0]
        self.encoder_stride = self.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-0.02, b=0.02)
        if init == "official":
            official_init_(self)

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
