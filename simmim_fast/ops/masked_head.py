"""Masked-only prediction head: gather the tokens that hold masked pixels -> linear head -> fused loss.

Shapes
    features     (B, h, w, F)   encoder output, NHWC
    weight       (K, F)         head weight, K = C*s*s (the official 1x1 conv ``decoder.0`` viewed 2-D)
    bias         (K,) or None
    images       (B, C, H, W)   H = h*s, W = w*s
    mask         (B, mh, mw)    0/1, dividing (H, W)
    token_index  (N,) int64     flattened (B, h, w) indices of the tokens holding masked pixels
    returns      float32 scalar, equal to ``masked_l1_loss(F.linear(features, weight, bias), images, mask)``

Only tokens with a masked pixel contribute to the SimMIM loss (``region="masked"``) or receive a
gradient, so the head runs on those rows only: with 32 px mask cells at ratio 0.6 that is 60% of the
tokens, i.e. 40% fewer head FLOPs and bytes, same loss and same gradients (for the features, the head
weight and bias) up to float summation order. The loss reads the gathered rows directly (the Triton
kernel of ``masked_l1_loss`` with a token index). It is exact for any mask (a partially masked token
is gathered and weighted per pixel); :func:`masked_head_plan` says when it pays, and the SimMIM model
uses it automatically then.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import INT32_LIMIT, check_float, check_same_batch, device_reasons, resolve_backend, size_reasons, upsample_mask
from .masked_l1_loss import (
    MAX_TILE,
    check_images_and_mask,
    check_options,
    fused_loss,
    per_element_loss,
)

OP = "masked_head_loss"

#: Against the full head + reference loss, by dtype of the features/head (summation order of the
#: loss and of the bias/weight gradients differs; the GEMM runs on fewer rows).
TOLERANCES = {
    torch.float32: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-4, atol=1e-6)),
    torch.bfloat16: dict(loss=dict(rtol=1e-2, atol=1e-4), grad=dict(rtol=2e-2, atol=1e-4)),
    torch.float16: dict(loss=dict(rtol=2e-3, atol=1e-5), grad=dict(rtol=4e-3, atol=1e-5)),
}


# ----------------------------------------------------------------------------------------------------
# which tokens


def token_mask(mask: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int], reduce: str = "any") -> torch.Tensor:
    """``(B, h, w)`` bool: tokens of the ``grid`` holding any (``reduce="any"``) / only (``"all"``) masked pixels."""
    B, mh, mw = mask.shape
    h, w = grid
    m = mask != 0
    if h % mh == 0 and w % mw == 0:  # cells cover whole tokens
        return upsample_mask(m, (h, w))
    if mh % h == 0 and mw % w == 0:  # tokens cover whole cells
        blocks = m.view(B, h, mh // h, w, mw // w)
        return blocks.any(4).any(2) if reduce == "any" else blocks.all(4).all(2)
    pix = upsample_mask(m, image_size)  # general geometry: through the pixel grid
    H, W = image_size
    blocks = pix.view(B, h, H // h, w, W // w)
    return blocks.any(4).any(2) if reduce == "any" else blocks.all(4).all(2)


def masked_token_index(mask: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """``(N,)`` int64: flattened ``(B, h, w)`` indices of the tokens holding at least one masked pixel."""
    return token_mask(mask, grid, image_size).flatten().nonzero().squeeze(1)


def masked_head_plan(
    mask: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int], *, region: str = "masked"
) -> tuple[torch.Tensor | None, str]:
    """Decide whether the masked-only head applies: ``(token_index, "")`` or ``(None, reason)``.

    It applies when the loss covers masked pixels only, the mask cells align with the head's token
    grid (every token entirely masked or entirely visible: statically when the cell is a multiple of
    the encoder stride, e.g. 32 px cells on Swin's stride 32 or ViT's 16, else checked on the mask's
    content, e.g. the official mask at model-patch resolution) and some token holds no masked pixel.
    Synchronises with the device once or twice (the number of gathered tokens is data-dependent).
    """
    if region != "masked":
        return None, f"region={region!r}: every token is predicted"
    B, mh, mw = mask.shape
    h, w = grid
    if not (h % mh == 0 and w % mw == 0):
        if not (mh % h == 0 and mw % w == 0):
            return None, f"mask grid {(mh, mw)} does not align with the token grid {(h, w)}"
        if not torch.equal(token_mask(mask, grid, image_size, "any"), token_mask(mask, grid, image_size, "all")):
            return None, f"mask cells at grid {(mh, mw)} do not align with the token grid {(h, w)} (partly masked tokens)"
    index = masked_token_index(mask, grid, image_size)
    if index.numel() == B * h * w:
        return None, "every token holds masked pixels"
    return index, ""


# ----------------------------------------------------------------------------------------------------
# checks, reference, op


def _check_inputs(features, weight, bias, images, mask, token_index, eps, loss, beta) -> int:
    check_float("features", features)
    check_float("weight", weight)
    if features.dim() != 4:
        raise ValueError(f"features: expected (B, h, w, F), got shape {tuple(features.shape)}")
    B, h, w, Fdim = features.shape
    check_same_batch(features=features, images=images, mask=mask)
    Bi, C, H, W = check_images_and_mask(images, mask)
    if Bi != B or H % h or W % w or H // h != W // w:
        raise ValueError(
            f"features: shape {tuple(features.shape)} does not tile images {tuple(images.shape)} "
            f"with one square stride (expected (B, H/s, W/s, F) with B={Bi})"
        )
    s = H // h
    if weight.shape != (C * s * s, Fdim):
        raise ValueError(f"weight: expected shape {(C * s * s, Fdim)} (C*s*s, F), got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (C * s * s,):
            raise ValueError(f"bias: expected shape ({C * s * s},), got {tuple(bias.shape)}")
    if token_index is not None:
        if not isinstance(token_index, torch.Tensor) or token_index.dtype != torch.int64 or token_index.dim() != 1:
            raise TypeError("token_index: expected a 1-D int64 tensor of flattened (B, h, w) token indices")
        if token_index.device != features.device:
            raise ValueError(f"token_index: on {token_index.device}, features on {features.device}")
    check_options(eps, loss, "masked", beta)
    return s


def not_supported_reasons(features, weight, images, mask) -> list[str]:
    """Every reason why the Triton loss cannot take the gathered rows of these inputs (empty: it can)."""
    reasons = device_reasons(features, weight, images, mask)
    reasons += size_reasons(images=images, mask=mask)
    rows = features.shape[0] * features.shape[1] * features.shape[2]
    if rows * weight.shape[0] > INT32_LIMIT:
        reasons.append(f"the head output ({rows} x {weight.shape[0]}) is larger than the kernels' int32 indexing allows")
    if images.dim() == 4 and images.shape[1] > 0 and weight.shape[0] // images.shape[1] > MAX_TILE:
        reasons.append(f"a token's s*s = {weight.shape[0] // images.shape[1]} pixels exceed one tile ({MAX_TILE})")
    return reasons


def masked_rows_loss_reference(pred_rows, token_index, images, mask, *, eps=1e-5, loss="l1", beta=1.0):
    """The reference loss of gathered prediction rows ``(N, C*s*s)`` of tokens ``token_index``.

    Gathers the matching pixels and full-resolution mask values (PixelShuffle order) and applies the
    official formula; ``m.sum()`` counts the whole mask.
    """
    B, C, H, W = images.shape
    N, K = pred_rows.shape
    s = math.isqrt(K // C)
    m_pix = upsample_mask(mask, (H, W)).to(torch.float32)  # (B, H, W)
    x_tok = F.pixel_unshuffle(images.float(), s).permute(0, 2, 3, 1).reshape(-1, C, s * s)
    m_tok = F.pixel_unshuffle(m_pix.unsqueeze(1), s).permute(0, 2, 3, 1).reshape(-1, 1, s * s)
    x_rows = x_tok.index_select(0, token_index)
    m_rows = m_tok.index_select(0, token_index)
    keep = m_rows != 0  # unmasked pixels never enter, whatever their value (as masked_l1_loss_reference)
    rows = torch.where(keep, pred_rows.float().view(N, C, s * s), 0.0)
    per = per_element_loss(rows, torch.where(keep, x_rows, 0.0), loss, beta) * m_rows
    return per.sum() / (m_pix.sum() + eps) / C


def masked_head_loss_reference(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_index: torch.Tensor | None = None,
    eps: float = 1e-5,
    loss: str = "l1",
    beta: float = 1.0,
    backend: str = "reference",
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`masked_head_loss` (gather + ``F.linear`` + reference loss of the rows)."""
    _check_inputs(features, weight, bias, images, mask, token_index, eps, loss, beta)
    B, h, w, Fdim = features.shape
    if token_index is None:
        token_index = masked_token_index(mask, (h, w), tuple(images.shape[2:]))
    rows = features.reshape(B * h * w, Fdim).index_select(0, token_index)
    pred_rows = F.linear(rows, weight, bias)
    return masked_rows_loss_reference(pred_rows, token_index, images, mask, eps=eps, loss=loss, beta=beta)


def masked_head_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_index: torch.Tensor | None = None,
    eps: float = 1e-5,
    loss: str = "l1",
    beta: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """SimMIM loss of the linear head run only on the tokens that hold masked pixels.

    ``token_index`` (from :func:`masked_head_plan` / :func:`masked_token_index`; computed from the
    mask when None) must list every token holding a masked pixel, each once. Differentiable in
    ``features``, ``weight`` and ``bias``.

    Equivalent PyTorch::

        masked_l1_loss(F.linear(features, weight, bias), images, mask, eps=eps, loss=loss, beta=beta)
    """
    _check_inputs(features, weight, bias, images, mask, token_index, eps, loss, beta)
    reasons = not_supported_reasons(features, weight, images, mask)
    if resolve_backend(OP, backend, reasons, features, weight, images, mask) == "reference":
        return masked_head_loss_reference(
            features, weight, bias, images, mask, token_index=token_index, eps=eps, loss=loss, beta=beta
        )
    B, h, w, Fdim = features.shape
    if token_index is None:
        token_index = masked_token_index(mask, (h, w), tuple(images.shape[2:]))
    rows = features.reshape(B * h * w, Fdim).index_select(0, token_index)
    pred_rows = F.linear(rows, weight, bias)
    return fused_loss(pred_rows, images, mask, token_index, eps=eps, loss=loss, region="masked", beta=beta)
