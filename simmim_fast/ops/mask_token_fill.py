"""Mask-token substitution: ``tokens * (1 - m) + mask_token * m``.

Shapes
    tokens      (B, L, C) or (B, H, W, C)
    mask        (B, L) or (B, H, W); for the 4-D form any (B, h, w) grid dividing (H, W)
                (nearest-upsampled). bool, integer or float 0/1.
    mask_token  (C,)
    returns     same shape and dtype as ``tokens``

Computed in float32 and stored in ``tokens.dtype``. Differentiable in ``tokens`` and ``mask_token``.
The Triton kernel is not written yet: ``backend="triton"`` raises with its reasons and ``auto``
takes the reference.
"""
from __future__ import annotations

import torch

from ._common import (
    check_float,
    check_grid,
    check_mask_dtype,
    device_reasons,
    resolve_backend,
    upsample_mask,
)

OP = "mask_token_fill"


def _check_inputs(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> None:
    check_float("tokens", tokens)
    check_mask_dtype("mask", mask)
    check_float("mask_token", mask_token)
    if tokens.dim() not in (3, 4):
        raise ValueError(f"tokens: expected (B, L, C) or (B, H, W, C), got shape {tuple(tokens.shape)}")
    B, C = tokens.shape[0], tokens.shape[-1]
    if mask_token.shape != (C,):
        raise ValueError(f"mask_token: expected shape ({C},) to match tokens' channels, got {tuple(mask_token.shape)}")
    if mask.shape[0] != B:
        raise ValueError(f"mask: batch {mask.shape[0]} does not match tokens' batch {B}")
    if tokens.dim() == 3:
        if mask.shape != (B, tokens.shape[1]):
            raise ValueError(f"mask: expected (B, L) = {(B, tokens.shape[1])} for 3-D tokens, got {tuple(mask.shape)}")
    else:
        if mask.dim() != 3:
            raise ValueError(f"mask: expected (B, h, w) for 4-D tokens, got shape {tuple(mask.shape)}")
        check_grid("mask", tuple(mask.shape[1:]), tuple(tokens.shape[1:3]), "token grid (H, W)")


def not_supported_reasons(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> list[str]:
    """Every reason why the Triton kernel cannot take these inputs (empty: it can)."""
    reasons = device_reasons(tokens, mask, mask_token)
    reasons.append("the Triton kernel of mask_token_fill is not implemented yet")
    return reasons


def mask_token_fill_reference(
    tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, *, backend: str = "reference"
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`mask_token_fill` (same signature, ``backend`` ignored)."""
    _check_inputs(tokens, mask, mask_token)
    if tokens.dim() == 4:
        m = upsample_mask(mask, tuple(tokens.shape[1:3]))
    else:
        m = mask
    w = m.to(torch.float32).unsqueeze(-1)
    out = tokens.to(torch.float32) * (1.0 - w) + mask_token.to(torch.float32) * w
    return out.to(tokens.dtype)


def mask_token_fill(
    tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Replace masked token embeddings by a learnable mask token.

    tokens ``(B, L, C)`` or ``(B, H, W, C)``; mask ``(B, L)`` / ``(B, h, w)`` 0/1 (a grid dividing
    ``(H, W)`` is upsampled by nearest repeat); mask_token ``(C,)``. Returns the tokens' shape/dtype.

    Equivalent PyTorch::

        w = mask.float().unsqueeze(-1)   # upsampled to (B, H, W, 1) for the 4-D form
        (tokens.float() * (1 - w) + mask_token.float() * w).to(tokens.dtype)
    """
    _check_inputs(tokens, mask, mask_token)
    chosen = resolve_backend(OP, backend, not_supported_reasons(tokens, mask, mask_token))
    # chosen can only be "reference" until the kernel exists (the reasons above are never empty).
    assert chosen == "reference"
    return mask_token_fill_reference(tokens, mask, mask_token)
