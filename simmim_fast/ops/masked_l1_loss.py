"""SimMIM reconstruction loss on masked pixels, read from the head's token layout.

Shapes
    pred     (B, h, w, C*s*s)  head output in ``PixelShuffle`` channel order
    images   (B, C, H, W)      with H = h*s, W = w*s
    mask     (B, mh, mw)       0/1, H % mh == 0 and W % mw == 0 (nearest-upsampled to pixels)
    returns  float32 scalar

The official SimMIM loss (``models/simmim.py``)::

    (|pixel_shuffle(pred) - images| * m).sum() / (m.sum() + eps) / C

with ``m`` the pixel mask broadcast over channels but counted once per pixel in ``m.sum()``.
``loss`` selects the per-element regression loss of the paper's ablation (``"l1"``, ``"l2"``,
``"smooth_l1"`` with ``beta``); ``region="all"`` is the reconstruct-all variant (``m`` = 1).
The Triton kernel is not written yet: ``backend="triton"`` raises with its reasons and ``auto``
takes the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_float, check_grid, check_mask_dtype, device_reasons, resolve_backend, upsample_mask
from .pixel_shuffle_head import head_stride

OP = "masked_l1_loss"
LOSSES = ("l1", "l2", "smooth_l1")
REGIONS = ("masked", "all")


def _check_inputs(pred, images, mask, eps, loss, region, beta) -> int:
    check_float("pred", pred)
    check_float("images", images)
    check_mask_dtype("mask", mask)
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    s = head_stride(pred, C)
    if pred.shape[0] != B or (pred.shape[1] * s, pred.shape[2] * s) != (H, W):
        raise ValueError(
            f"pred: shape {tuple(pred.shape)} (stride {s}) does not produce images of shape "
            f"{tuple(images.shape)}: expected ({B}, {H // s}, {W // s}, {C * s * s})"
        )
    if mask.dim() != 3 or mask.shape[0] != B:
        raise ValueError(f"mask: expected (B, mh, mw) with B={B}, got shape {tuple(mask.shape)}")
    check_grid("mask", tuple(mask.shape[1:]), (H, W), "image size (H, W)")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if region not in REGIONS:
        raise ValueError(f"region: expected one of {REGIONS}, got {region!r}")
    if not (eps >= 0):
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if loss == "smooth_l1" and not (beta > 0):
        raise ValueError(f"beta: expected a positive float for smooth_l1, got {beta!r}")
    return s


def not_supported_reasons(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Every reason why the Triton kernel cannot take these inputs (empty: it can)."""
    reasons = device_reasons(pred, images, mask)
    reasons.append("the Triton kernel of masked_l1_loss is not implemented yet")
    return reasons


def masked_l1_loss_reference(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-5,
    loss: str = "l1",
    region: str = "masked",
    beta: float = 1.0,
    backend: str = "reference",
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`masked_l1_loss` (same signature, ``backend`` ignored).

    Materialises the shuffled prediction and the full-resolution mask, as the official code does.
    """
    s = _check_inputs(pred, images, mask, eps, loss, region, beta)
    C, H, W = images.shape[1:]
    x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), s).float()
    x = images.float()
    if loss == "l1":
        per_elem = (x_rec - x).abs()
    elif loss == "l2":
        per_elem = (x_rec - x).square()
    else:
        per_elem = F.smooth_l1_loss(x_rec, x, reduction="none", beta=beta)
    if region == "all":
        return per_elem.sum() / (per_elem[:, :1].numel() + eps) / C
    m = upsample_mask(mask, (H, W)).to(torch.float32).unsqueeze(1)
    return (per_elem * m).sum() / (m.sum() + eps) / C


def masked_l1_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-5,
    loss: str = "l1",
    region: str = "masked",
    beta: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """SimMIM loss over masked pixels, from the head output in token layout ``(B, h, w, C*s*s)``.

    Returns a float32 scalar, differentiable in ``pred``.

    Equivalent PyTorch::

        m = mask.repeat_interleave(H // mh, 1).repeat_interleave(W // mw, 2).unsqueeze(1).float()
        x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), s).float()
        ((x_rec - images).abs() * m).sum() / (m.sum() + eps) / C
    """
    _check_inputs(pred, images, mask, eps, loss, region, beta)
    chosen = resolve_backend(OP, backend, not_supported_reasons(pred, images, mask))
    assert chosen == "reference"
    return masked_l1_loss_reference(pred, images, mask, eps=eps, loss=loss, region=region, beta=beta)
