"""Public fused ops of simmim-fast; one module per op (kernel, autograd, reference, capability check).

    mask_token_fill(tokens, mask, mask_token, *, deterministic=None, backend="auto")
    pixel_shuffle_head(pred, *, in_chans=3, backend="auto")
    masked_l1_loss(pred, images, mask, *, eps=1e-5, loss="l1", region="masked", beta=1.0, norm_target=None,
                   backend="auto")
    masked_head_loss(features, weight, bias, images, mask, *, token_index=None, eps=1e-5, loss="l1",
                     beta=1.0, norm_target=None, check_index=None, backend="auto")
    normalize_targets(images, *, patch_size=47, backend="auto")   # SwinV2 SimMIM's NORM_TARGET
    swin_window_attention(qkv, bias_table, *, num_heads, window_size, shift_size=0, resolution=None,
                          scale=None, attn_mask=None, backend="auto")          # Swin (shifted-)window attention

Each has a ``*_reference`` twin with the same signature, a ``not_supported_reasons`` check and a
``TOLERANCES`` table (Triton path vs reference) in its module. The Triton paths are registered with
``torch.library`` (``simmim_fast::*``), so ``torch.compile`` traces them without graph breaks.
"""
from __future__ import annotations

import torch

from . import mask_token_fill as _fill_mod
from . import masked_head as _head_mod
from . import masked_l1_loss as _loss_mod
from . import pixel_shuffle_head as _shuffle_mod
from . import norm_target as _norm_mod
from . import window_attention as _wattn_mod
from ._common import BACKENDS
from .mask_token_fill import mask_token_fill, mask_token_fill_reference
from .masked_head import check_token_index, masked_head_loss, masked_head_loss_reference, masked_head_plan, masked_token_index
from .masked_l1_loss import masked_l1_loss, masked_l1_loss_reference
from .norm_target import normalize_targets, normalize_targets_reference
from .pixel_shuffle_head import pixel_shuffle_head, pixel_shuffle_head_reference
from .window_attention import swin_window_attention, swin_window_attention_reference

__all__ = [
    "BACKENDS",
    "mask_token_fill",
    "mask_token_fill_reference",
    "pixel_shuffle_head",
    "pixel_shuffle_head_reference",
    "masked_l1_loss",
    "masked_l1_loss_reference",
    "masked_head_loss",
    "masked_head_loss_reference",
    "masked_head_plan",
    "masked_token_index",
    "check_token_index",
    "normalize_targets",
    "normalize_targets_reference",
    "swin_window_attention",
    "swin_window_attention_reference",
    "backend_report",
]


def backend_report(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """For each op, the reasons its Triton kernel cannot run on small inputs on ``device``.

    ``device`` defaults to CUDA when available, else CPU. An empty list means a forced
    ``backend="triton"`` runs there (``auto`` uses Triton only on CUDA tensors).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = torch.zeros(1, 2, 2, 12, device=dev)
    m = torch.zeros(1, 2, 2, device=dev)
    img = torch.zeros(1, 3, 4, 4, device=dev)
    return {
        "mask_token_fill": _fill_mod.not_supported_reasons(t, m, torch.zeros(12, device=dev)),
        "pixel_shuffle_head": _shuffle_mod.not_supported_reasons(t),
        "masked_l1_loss": _loss_mod.not_supported_reasons(t, img, m),
        "masked_head_loss": _head_mod.not_supported_reasons(t, torch.zeros(12, 12, device=dev), img, m),
        "swin_window_attention": _wattn_mod.not_supported_reasons(
            torch.zeros(1, 2, 2, 12, device=dev), torch.zeros(9, 2, device=dev), num_heads=2, window_size=2,
            shift_size=1),
        "normalize_targets": _norm_mod.not_supported_reasons(img, patch_size=3),
    }
