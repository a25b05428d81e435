"""Pixel-head reshape: token-layout prediction to image layout.

Shapes
    pred     (B, h, w, C*s*s) in ``torch.nn.PixelShuffle`` channel order (index ``c*s*s + i*s + j``),
             any strides
    returns  (B, C, h*s, w*s), dtype of ``pred`` (contiguous)

Triton path: one gather kernel, ``out[b, c, y*s+i, x*s+j] = pred[b, y, x, c*s*s + i*s + j]``, tiled
over output rows/columns (writes coalesced, reads in runs of ``s`` channels). Backward is the same
kernel run the other way (a pure permutation, so gradients are exact).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    check_float,
    device_reasons,
    new_output,
    next_pow2,
    resolve_backend,
    size_reasons,
    tl,
    triton,
)
from ._library import register

OP = "pixel_shuffle_head"

#: A permutation: output and gradient are bit-exact in every dtype.
TOLERANCES = {dt: dict(rtol=0.0, atol=0.0) for dt in (torch.float32, torch.bfloat16, torch.float16)}

if HAS_TRITON:

    @triton.jit
    def _shuffle_kernel(
        src_ptr, dst_ptr,
        C, h, w, s,
        p_sb, p_sy, p_sx, p_sk,
        i_sb, i_sc, i_sy, i_sx,
        TO_IMAGE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    ):
        """Tile (BLOCK_Y x BLOCK_X) of image (b, c); token layout strides p_*, image strides i_*."""
        bc = tl.program_id(0)
        b = bc // C
        c = bc - b * C
        Y = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
        X = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
        ok = (Y < h * s)[:, None] & (X < w * s)[None, :]
        y = Y // s
        i = Y - y * s
        x = X // s
        j = X - x * s
        tok = (b * p_sb + y * p_sy + (c * s * s + i * s) * p_sk)[:, None] + (x * p_sx + j * p_sk)[None, :]
        img = (b * i_sb + c * i_sc + Y * i_sy)[:, None] + (X * i_sx)[None, :]
        if TO_IMAGE:
            tl.store(dst_ptr + img, tl.load(src_ptr + tok, mask=ok), mask=ok)
        else:
            tl.store(dst_ptr + tok, tl.load(src_ptr + img, mask=ok), mask=ok)


def _launch(launch, tokens_like, image_like, C, s, to_image):
    B, h, w, _ = tokens_like.shape
    H, W = h * s, w * s
    if tokens_like.numel() == 0:
        return
    block_x = min(next_pow2(W), 128)
    block_y = max(1, min(4096 // block_x, next_pow2(H)))
    grid = (B * C, triton.cdiv(H, block_y), triton.cdiv(W, block_x))
    src, dst = (tokens_like, image_like) if to_image else (image_like, tokens_like)
    launch(_shuffle_kernel)[grid](
        src, dst, C, h, w, s, *tokens_like.stride(), *image_like.stride(),
        TO_IMAGE=to_image, BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=4,
    )


def _forward_impl(launch, pred, in_chans):
    B, h, w, K = pred.shape
    s = math.isqrt(K // in_chans)
    out = new_output((B, in_chans, h * s, w * s), dtype=pred.dtype, device=pred.device)
    _launch(launch, pred, out, in_chans, s, True)
    return out


def _forward_fake(pred: torch.Tensor, in_chans: int) -> torch.Tensor:
    B, h, w, K = pred.shape
    s = math.isqrt(K // in_chans)
    return pred.new_empty((B, in_chans, h * s, w * s))


def _backward_impl(launch, grad, s):
    B, C, H, W = grad.shape
    out = new_output((B, H // s, W // s, C * s * s), dtype=grad.dtype, device=grad.device)
    _launch(launch, out, grad, C, s, False)
    return out


def _backward_fake(grad: torch.Tensor, s: int) -> torch.Tensor:
    B, C, H, W = grad.shape
    return grad.new_empty((B, H // s, W // s, C * s * s))


_BWD = register("pixel_shuffle_head_backward", _backward_impl, _backward_fake)


def _autograd(traceable: bool):
    bwd_op = _BWD.traceable if traceable else _BWD.opaque

    def setup_context(ctx, inputs, output):
        pred, in_chans = inputs
        ctx.s = math.isqrt(pred.shape[-1] // in_chans)

    def backward(ctx, grad):
        return bwd_op(grad, ctx.s), None

    return setup_context, backward


_FWD = register("pixel_shuffle_head", _forward_impl, _forward_fake, autograd=_autograd)


def head_stride(pred: torch.Tensor, in_chans: int, name: str = "pred") -> int:
    """The upscale factor ``s`` of a ``(B, h, w, C*s*s)`` prediction; ValueError if it is not one."""
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans <= 0:
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


def not_supported_reasons(pred: torch.Tensor, *, in_chans: int = 3) -> list[str]:
    """Every reason why the Triton kernel cannot take ``pred`` (empty: it can)."""
    reasons = device_reasons(pred)
    reasons += size_reasons(pred=pred)
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
    if resolve_backend(OP, backend, not_supported_reasons(pred, in_chans=in_chans), pred) == "reference":
        return pixel_shuffle_head_reference(pred, in_chans=in_chans)
    return _FWD.pick(pred)(pred, in_chans)
