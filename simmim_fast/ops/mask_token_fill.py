"""Mask-token substitution: ``tokens * (1 - m) + mask_token * m``.

Shapes
    tokens      (B, L, C) or (B, H, W, C)   any strides
    mask        (B, L) or (B, H, W); for the 4-D form any (B, h, w) grid dividing (H, W)
                (nearest-upsampled). bool, integer or float 0/1.
    mask_token  (C,)
    returns     same shape and dtype as ``tokens`` (contiguous on the Triton path)

Computed in float32 and stored in ``tokens.dtype``. Differentiable in ``tokens`` and ``mask_token``.

Triton path: one pass reads the tokens and the mask at its own (coarse) grid (the mask is never
upsampled in memory) and writes the blended tokens. Tokens that are an NCHW tensor viewed as
``(B, H, W, C)`` (ViT's conv patch embedding) take a kernel that reads each tile along tokens and
writes it along channels (coalesced on both sides) instead of a strided, element-by-element gather.
Backward: ``dtokens = g * (1 - m)`` and
``dmask_token = sum(g * m)`` reduced in the same kernel, per program in registers, then either
two-stage (per-program partial sums reduced by ``torch.sum``: bit-exact run to run,
``deterministic=True``) or with fp32 atomics (``deterministic=False``). ``deterministic=None``
follows ``torch.are_deterministic_algorithms_enabled()``.

The position-embedding add is not fused: none of the official encoders adds an absolute position
embedding to the patch tokens (Swin: ``ape=False``; the SimMIM ViT uses a shared relative-position
bias), so there is nothing to fuse for them.
"""
from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    cast_to,
    check_float,
    check_grid,
    check_mask_dtype,
    device_reasons,
    kernel_mask,
    new_output,
    next_pow2,
    resolve_backend,
    size_reasons,
    tl,
    triton,
    upsample_mask,
)
from ._library import register

OP = "mask_token_fill"

#: Tolerances of the Triton path against the reference. With 0/1 masks the output and ``dtokens``
#: are an exact select (compared bit for bit); ``dmask_token`` is a float32 sum whose order differs
#: from the reference, rounded once to its dtype (about 2 ulp of bf16/fp16).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}

# ----------------------------------------------------------------------------------------------------
# kernels

if HAS_TRITON:

    @triton.jit
    def _fill_fwd_kernel(
        t_ptr, m_ptr, mt_ptr, out_ptr,
        n_rows, H, W, C, rh, rw,
        t_sb, t_sh, t_sw, t_sc,
        m_sb, m_sh, m_sw, mt_s,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One (BLOCK_R tokens) x (BLOCK_C channels) tile; token r = (b, y, x) reads mask[b, y//rh, x//rw]."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < C
        hw = H * W
        b = rows // hw
        rem = rows - b * hw
        y = rem // W
        x = rem - y * W
        w = tl.load(m_ptr + b * m_sb + (y // rh) * m_sh + (x // rw) * m_sw, mask=rmask, other=0).to(tl.float32)
        mt = tl.load(mt_ptr + cols * mt_s, mask=cmask, other=0).to(tl.float32)
        tile = rmask[:, None] & cmask[None, :]
        t = tl.load(t_ptr + (b * t_sb + y * t_sh + x * t_sw)[:, None] + cols[None, :] * t_sc, mask=tile, other=0)
        t = t.to(tl.float32)
        w2 = w[:, None]
        out = t * (1.0 - w2) + mt[None, :] * w2
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], cast_to(out, out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _fill_fwd_cf_kernel(
        t_ptr, m_ptr, mt_ptr, out_ptr,
        W, C, rh, rw,
        m_sb, m_sh, m_sw, mt_s,
        HW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Channels-first tokens: an NCHW tensor ``(B, C, H, W)`` viewed as ``(B, H, W, C)`` (what a conv
        patch embedding's ``flatten(2).transpose(1, 2)`` gives). A (BLOCK_L tokens) x (BLOCK_C channels)
        tile of image ``program_id(0)`` is read along tokens (contiguous there; ``HW`` is a constexpr so
        the compiler knows each channel plane's alignment) and written along channels: Triton moves the
        tile through shared memory between the two layouts, so both sides are coalesced."""
        b = tl.program_id(0)
        l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        lmask = l < HW
        cmask = cols < C
        y = l // W
        x = l - y * W
        w = tl.load(m_ptr + b * m_sb + (y // rh) * m_sh + (x // rw) * m_sw, mask=lmask, other=0).to(tl.float32)
        mt = tl.load(mt_ptr + cols * mt_s, mask=cmask, other=0).to(tl.float32)
        tile = lmask[:, None] & cmask[None, :]
        plane = (b * C + cols) * HW  # start of each channel's (H, W) plane
        t = tl.load(t_ptr + plane[None, :] + l[:, None], mask=tile, other=0).to(tl.float32)
        w2 = w[:, None]
        out = t * (1.0 - w2) + mt[None, :] * w2
        tl.store(out_ptr + (b * HW + l)[:, None] * C + cols[None, :], cast_to(out, out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _fill_bwd_kernel(
        g_ptr, m_ptr, dt_ptr, part_ptr,
        n_rows, H, W, C, rh, rw, iters,
        g_sb, g_sh, g_sw, g_sc,
        m_sb, m_sh, m_sw,
        ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """``iters`` row tiles per program: writes ``g * (1 - m)`` and reduces ``sum(g * m)`` over its rows."""
        pid_r = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        hw = H * W
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        # A while loop, not ``for it in range(iters)``: triton 3.6's interpreter cannot take a runtime
        # bound in range() with NumPy >= 2.4 (TypeError); compiled, both become the same scf loop.
        it = 0
        while it < iters:
            rows = (pid_r * iters + it) * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < n_rows
            b = rows // hw
            rem = rows - b * hw
            y = rem // W
            x = rem - y * W
            w = tl.load(m_ptr + b * m_sb + (y // rh) * m_sh + (x // rw) * m_sw, mask=rmask, other=0)
            w2 = w.to(tl.float32)[:, None]
            tile = rmask[:, None] & cmask[None, :]
            g = tl.load(g_ptr + (b * g_sb + y * g_sh + x * g_sw)[:, None] + cols[None, :] * g_sc, mask=tile, other=0)
            g = g.to(tl.float32)
            tl.store(dt_ptr + rows[:, None] * C + cols[None, :], cast_to(g * (1.0 - w2), dt_ptr.dtype.element_ty), mask=tile)
            acc += tl.sum(g * w2, axis=0)
            it += 1
        if ATOMIC:
            tl.atomic_add(part_ptr + cols, acc, mask=cmask)
        else:
            tl.store(part_ptr + pid_r * C + cols, acc, mask=cmask)


def _tiles(n_rows: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): ~4096-element tiles, channels innermost."""
    block_c = min(next_pow2(C), 128)
    block_r = max(1, min(4096 // block_c, next_pow2(n_rows)))
    return block_r, block_c, 4


# ----------------------------------------------------------------------------------------------------
# host code (registered twice with torch.library, see _library.py)


def channels_first(tokens: torch.Tensor) -> bool:
    """True for ``(B, H, W, C)`` tokens that are an NCHW-contiguous tensor viewed channels-last."""
    B, H, W, C = tokens.shape
    return C > 1 and H * W > 1 and tokens.stride() == (C * H * W, W, 1, H * W)


def _forward_impl(launch, tokens, mask, mask_token, deterministic):
    B, H, W, C = tokens.shape
    out = new_output((B, H, W, C), dtype=tokens.dtype, device=tokens.device)
    n_rows = B * H * W
    if out.numel() == 0:
        return out
    m = kernel_mask(mask)
    if channels_first(tokens):
        block_l, block_c = 64, min(next_pow2(C), 64)
        grid = (B, triton.cdiv(H * W, block_l), triton.cdiv(C, block_c))
        launch(_fill_fwd_cf_kernel)[grid](
            tokens, m, mask_token, out,
            W, C, H // m.shape[1], W // m.shape[2],
            *m.stride(), mask_token.stride(0),
            HW=H * W, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4,
        )
        return out
    block_r, block_c, warps = _tiles(n_rows, C)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C, block_c))
    launch(_fill_fwd_kernel)[grid](
        tokens, m, mask_token, out,
        n_rows, H, W, C, H // m.shape[1], W // m.shape[2],
        *tokens.stride(), *m.stride(), mask_token.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


def _forward_fake(
    tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, deterministic: bool
) -> torch.Tensor:
    return tokens.new_empty(tokens.shape)


def _backward_impl(launch, grad, mask, mask_token, deterministic):
    B, H, W, C = grad.shape
    dtokens = new_output((B, H, W, C), dtype=grad.dtype, device=grad.device)
    n_rows = B * H * W
    if dtokens.numel() == 0:
        return dtokens, torch.zeros(C, dtype=mask_token.dtype, device=grad.device)
    m = kernel_mask(mask)
    block_r, block_c, warps = _tiles(n_rows, C)
    row_tiles = triton.cdiv(n_rows, block_r)
    iters = min(8, row_tiles)
    grid = (triton.cdiv(row_tiles, iters), triton.cdiv(C, block_c))
    if deterministic:
        part = new_output((grid[0], C), dtype=torch.float32, device=grad.device)
    else:
        part = torch.zeros(C, dtype=torch.float32, device=grad.device)
    launch(_fill_bwd_kernel)[grid](
        grad, m, dtokens, part,
        n_rows, H, W, C, H // m.shape[1], W // m.shape[2], iters,
        *grad.stride(), *m.stride(),
        ATOMIC=not deterministic, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    dmt = part.sum(0) if deterministic else part
    return dtokens, dmt.to(mask_token.dtype)


def _backward_fake(
    grad: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return grad.new_empty(grad.shape), mask_token.new_empty(mask_token.shape)


_BWD = register("mask_token_fill_backward", _backward_impl, _backward_fake)


def _autograd(traceable: bool):
    bwd_op = _BWD.traceable if traceable else _BWD.opaque

    def setup_context(ctx, inputs, output):
        tokens, mask, mask_token, deterministic = inputs
        ctx.save_for_backward(mask, mask_token)
        ctx.deterministic = deterministic

    def backward(ctx, grad):
        mask, mask_token = ctx.saved_tensors
        dtokens, dmt = bwd_op(grad, mask, mask_token, ctx.deterministic)
        return dtokens, None, dmt, None

    return setup_context, backward


_FWD = register("mask_token_fill", _forward_impl, _forward_fake, autograd=_autograd)


# ----------------------------------------------------------------------------------------------------
# public API


def _check_inputs(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> None:
    check_float("tokens", tokens)
    check_mask_dtype("mask", mask)
    check_float("mask_token", mask_token)
    if tokens.dim() not in (3, 4):
        raise ValueError(f"tokens: expected (B, L, C) or (B, H, W, C), got shape {tuple(tokens.shape)}")
    B, C = tokens.shape[0], tokens.shape[-1]
    if mask_token.shape != (C,):
        raise ValueError(f"mask_token: expected shape ({C},) to match tokens' channels, got {tuple(mask_token.shape)}")
    if mask.dim() == 0 or mask.shape[0] != B:
        raise ValueError(f"mask: batch {tuple(mask.shape)[:1]} does not match tokens' batch {B}")
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
    reasons += size_reasons(tokens=tokens)
    return reasons


def mask_token_fill_reference(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    *,
    deterministic: bool | None = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`mask_token_fill` (same signature, ``deterministic``/``backend`` ignored)."""
    _check_inputs(tokens, mask, mask_token)
    if tokens.dim() == 4:
        m = upsample_mask(mask, tuple(tokens.shape[1:3]))
    else:
        m = mask
    w = m.to(torch.float32).unsqueeze(-1)
    out = tokens.to(torch.float32) * (1.0 - w) + mask_token.to(torch.float32) * w
    return out.to(tokens.dtype)


def mask_token_fill(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    *,
    deterministic: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Replace masked token embeddings by a learnable mask token.

    tokens ``(B, L, C)`` or ``(B, H, W, C)``; mask ``(B, L)`` / ``(B, h, w)`` 0/1 (a grid dividing
    ``(H, W)`` is upsampled by nearest repeat, on the Triton path only in the index arithmetic);
    mask_token ``(C,)``. Returns the tokens' shape/dtype. ``deterministic`` (Triton backward of
    ``mask_token``): True = two-stage reduction, bit-exact run to run; False = fp32 atomics;
    None = ``torch.are_deterministic_algorithms_enabled()``.

    Equivalent PyTorch::

        w = mask.float().unsqueeze(-1)   # upsampled to (B, H, W, 1) for the 4-D form
        (tokens.float() * (1 - w) + mask_token.float() * w).to(tokens.dtype)
    """
    _check_inputs(tokens, mask, mask_token)
    reasons = not_supported_reasons(tokens, mask, mask_token)
    if resolve_backend(OP, backend, reasons, tokens, mask, mask_token) == "reference":
        return mask_token_fill_reference(tokens, mask, mask_token)
    det = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    three_d = tokens.dim() == 3
    t4, m3 = (tokens.unsqueeze(2), mask.unsqueeze(2)) if three_d else (tokens, mask)
    out = _FWD.pick(tokens)(t4, m3, mask_token, det)
    return out.squeeze(2) if three_d else out


__all__ = ["mask_token_fill", "mask_token_fill_reference", "not_supported_reasons", "TOLERANCES"]
