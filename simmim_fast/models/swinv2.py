"""Swin Transformer V2 encoder for SimMIM, built on timm's ``SwinTransformerV2``.

As the official ``SwinTransformerV2ForSimMIM`` (microsoft/Swin-Transformer ``models/simmim.py``): the
mask token replaces masked patch embeddings right after the patch embedding (and its LayerNorm,
``PATCH_NORM``), no absolute position embedding (``APE`` False in every official config), no
``pretrained_window_sizes`` in pretraining (the official ``build_simmim`` does not pass them: each
block's log-spaced CPB coordinates are normalised by its own window), then the stages and the final
LayerNorm. The encoder returns the final-stage features in NHWC.

SwinV2 against V1 (what the official code does, and timm with it): res-post-norm blocks
(``x + norm1(attn(x))``, ``x + norm2(mlp(x))``, the block norms initialised to 0), scaled cosine
attention with a per-head ``logit_scale`` clamped at ``log 100``, the bias ``16 * sigmoid(cpb_mlp(
log-spaced relative coordinates))`` instead of a table, ``q_bias``/``v_bias`` (k has none), and a patch
merging that reduces THEN normalises (``norm`` over ``2C``). Key layout: the official code puts the
patch merging at the end of stage ``i`` (``layers.i.downsample``), timm at the start of stage ``i+1``
(``models.interchange`` maps the keys).

Window attention: every timm SwinV2 ``WindowAttention`` is swapped at construction for
:class:`~simmim_fast.models.window_attention_v2.WindowAttentionV2` with ``attn_backend`` (``"auto"``:
SDPA); ``attn_backend="timm"`` keeps timm's modules. Parameters and ``state_dict`` keys are timm's
either way.

Shapes
    images   (B, 3, H, W)            normalised
    mask     (B, H/p, W/p) or any (B, h, w) grid dividing it (0/1)
    returns  (B, H/32, W/32, C_out)  C_out = embed_dim * 8
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.swin_transformer_v2 import SwinTransformerV2

from ..ops import mask_token_fill
from .window_attention_v2 import BACKENDS as ATTN_BACKENDS
from .window_attention_v2 import swap_window_attention_v2

__all__ = ["SwinV2EncoderForSimMIM", "ENCODER_ATTN_BACKENDS", "stage_windows"]

ENCODER_ATTN_BACKENDS = ATTN_BACKENDS + ("timm",)


def stage_windows(model: SwinTransformerV2) -> tuple[int, ...]:
    """The window side each stage of a timm SwinV2 really uses (clipped to the stage's resolution).

    The official rule (and timm's for square inputs): a stage whose resolution is at most its window
    size runs one window of the whole stage, unshifted. For 192 px and window 12: ``(12, 12, 12, 6)``,
    the official fine-tuning configs' ``PRETRAINED_WINDOW_SIZES``.
    """
    out = []
    for stage in model.layers:
        ws = stage.blocks[0].window_size
        if ws[0] != ws[1]:
            raise ValueError(f"model: stage windows must be square, got {tuple(ws)}")
        out.append(int(ws[0]))
    return tuple(out)


class SwinV2EncoderForSimMIM(SwinTransformerV2):
    """timm ``SwinTransformerV2`` with a SimMIM mask token; ``num_classes`` is always 0.

    ``attn_backend``: ``"auto" | "sdpa" | "math"`` for our window attention, or ``"timm"`` to keep timm's
    ``WindowAttention`` (``"triton"``/``"xformers"`` raise ``NotImplementedError``: cosine attention is not
    supported by those kernels yet).
    """

    def __init__(self, *, ops_backend: str = "auto", attn_backend: str = "auto", **kwargs):
        if not isinstance(attn_backend, str) or attn_backend not in ENCODER_ATTN_BACKENDS:
            raise ValueError(f"attn_backend: expected one of {ENCODER_ATTN_BACKENDS}, got {attn_backend!r}")
        for key, why in (("ape", "timm's SwinTransformerV2 has no absolute position embedding (no official "
                                  "SwinV2 config uses one)"),
                         ("patch_norm", "timm's SwinTransformerV2 always normalises the patch embedding "
                                        "(PATCH_NORM True in every official config)")):
            if key in kwargs:
                raise TypeError(f"{key}: not an argument of the SwinV2 encoder: {why}")
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.ops_backend = ops_backend
        self.attn_backend = attn_backend
        if attn_backend != "timm":
            swap_window_attention_v2(self, backend=attn_backend)
        self.patch_size = self.patch_embed.patch_size[0]
        self.encoder_stride = self.patch_size * 2 ** (self.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Each stage's window side in use (see :func:`stage_windows`)."""
        return stage_windows(self)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """images ``(B, 3, H, W)``, mask ``(B, h, w)`` -> features ``(B, H/32, W/32, C)``."""
        x = self.patch_embed(x)  # (B, Hp, Wp, C), LayerNorm included
        x = mask_token_fill(x, mask, self.mask_token.view(-1), backend=self.ops_backend)
        x = self.layers(x)
        return self.norm(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's (every ``cpb_mlp`` / ``logit_scale`` parameter) and the mask token."""
        return set(super().no_weight_decay()) | {"mask_token"}
