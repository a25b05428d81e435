"""Pixel-head reshape: token-layout prediction to image layout.

Shapes
    pred     (B, h, w, C*s*s) in ``torch.nn.PixelShuffle`` channel order (index ``c*s*s + i*s + j``)
    returns  (B, C, h*s, w*s), dtype of ``pred``

The Triton kernel is not written yet: ``backend="triton"`` raises with its reasons and ``auto``
takes the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_float, device_reasons, resolve_backend

OP = "pixel_shuffle_head"


def head_stride(pred: torch.Tensor, in_chans: int, name: str = "pred") -> int:
    """The upscale factor ``s`` of a ``(B, h, w, C*s*s)`` prediction; ValueError if it is not one."""
    if not isinstance(in_chans, int) or in_chans <= 0:
        raise ValueError(f"in_chans: expected a positive int, got {in_chans!r}")
    if pred.dim() != 4:
        raise ValueError(f"{name}: expected (B, h, w, C*s*s), got shape {tuple(pred.shape)}")
    k = pred.shape[-1]
    s = math.isqrt(k // in_chans) if k % in_chans == 0 else 0
    if s <= 0 or s * s * in_chans != k:
        raise ValueError(
            f"{name}: last dim {k} is not in_chans*s*s for in_chans={in_chans} and an integer stride s"
        )
    return s


def not_supported_reasons(pred: torch.Tensor) -> list[str]:
    """Every reason why the Triton kernel cannot take ``pred`` (empty: it can)."""
    reasons = device_reasons(pred)
    reasons.append("the Triton kernel of pixel_shuffle_head is not implemented yet")
    return reasons


def pixel_shuffle_head_reference(pred: torch.Tensor, *, in_chans: int = 3, backend: str = "reference") -> torch.Tensor:
    """Plain PyTorch twin of :func:`pixel_shuffle_head` (same signature, ``backend`` ignored)."""
    check_float("pred", pred)
    s = head_stride(pred, in_chans)
    return F.pixel_shuffle(pred.permute(0, 3, 1, 2), s)


def pixel_shuffle_head(pred: torch.Tensor, *, in_chans: int = 3, backend: str = "auto") -> torch.Tensor:
    """Rearrange a per-token prediction ``(B, h, w, C*s*s)`` into an image ``(B, C, h*s, w*s)``.

    Equivalent PyTorch: ``F.pixel_shuffle(pred.permute(0, 3, 1, 2), s)``.
    """
    check_float("pred", pred)
    head_stride(pred, in_chans)
    chosen = resolve_backend(OP, backend, not_supported_reasons(pred))
    assert chosen == "reference"
    return pixel_shuffle_head_reference(pred, in_chans=in_chans)
