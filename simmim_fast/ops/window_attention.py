"""Swin (shifted-)window attention from the qkv projection's token layout, fused in Triton.

Shapes (``nH`` heads, ``hd`` head dim, ``C = nH*hd``, window ``(Wh, Ww)``, ``N = Wh*Ww`` tokens per window)
    qkv          (B, Hq, Wq, 3*C), (B, Hq, Wq, 3, nH, hd) or (B, Hq*Wq, 3*C)   any strides
                 what ``nn.Linear(dim, 3*C)`` gives on the (zero-padded) normed tokens; channel
                 ``s*C + h*hd + d`` is q (s=0), k (1), v (2) of head h
    bias_table   ((2Wh-1)*(2Ww-1), nH)   the relative-position bias table (timm's parameter)
    attn_mask    None or (nM, N, N)      an extra additive mask, window ``g`` (``b*nW + w``) reads
                                         ``attn_mask[g % nM]`` (how timm's window-level module gets its mask)
    returns      (B, H, W, C) (or (B, H*W, C))   un-shifted token layout, heads concatenated: the
                                         input of the output projection

``resolution=(H, W)`` are the real tokens; ``(Hq, Wq)`` must be ``(H, W)`` rounded up to multiples of
the window (the caller zero-pads the normed input before the qkv GEMM when H or W is not a multiple,
so padded tokens carry the projection of zeros, as in timm).

Semantics are those of timm's ``SwinTransformerBlock._attn`` + ``WindowAttention`` (math branch):
roll the tokens by ``(-sh, -sw)``, zero-pad to ``(Hq, Wq)``, partition into windows, per window and head
``softmax(q k^T * scale + table[rel_index] + shift_mask + attn_mask) v`` where the shift mask is timm's
``get_attn_mask`` on the padded grid (-100 between tokens of different regions), merge, crop to
``(H, W)`` and roll back by ``(sh, sw)``.

Triton path. Forward: one program per (chunk of windows, block of queries, head) finds each window's
tokens by index arithmetic with the cyclic shift applied (no roll, no partition copy), loads q, k, v
straight from the qkv buffer, adds the bias gathered from the table in-kernel (once per program, it is
the same for every window) and the shift mask computed from token coordinates (no bias or mask
tensor), keeps the whole ``N x N`` score tile on chip (``N <= 64``: the whole window in one tile; larger
windows: ``BM`` queries against all keys), softmax in fp32, and writes the output at the un-shifted
token positions. The row log-sum-exp (base 2, fp32 ``(G, nH, N)``) is kept for the backward.
Backward (flash-attention style recompute of P): ``dV = P^T dO``, ``dP = dO V^T``,
``dS = P * (dP - rowsum(dO * O))``, ``dQ = dS K * scale``, ``dK = dS^T Q * scale``, written into one packed
``(B, Hq, Wq, 3*C)`` gradient (padded tokens included: zero dq, real dk/dv). For ``N <= 64`` one kernel
does everything per (chunk, head); for larger windows a dq kernel (query blocks, also writes
``rowsum(dO * O)``) runs before a dk/dv kernel (key blocks). The bias-table gradient is ``sum(dS)`` per
(head, query position, key position): each program accumulates it in registers over its chunk of
windows and stores one fp32 partial ``(chunks, nH, N, N)`` (stage 1); ``torch.sum`` over the chunks and
a fixed-order gather-sum onto the table entries give ``(T, nH)`` (stage 2). Deterministic (no atomics)
and never a per-image ``(B, nW*nH, N, N)`` bias gradient. See :func:`kernel_traffic` for the bytes.

Not supported by the kernel (``not_supported_reasons`` says so): attention dropout, SwinV2's cosine
attention (logit scale, CPB bias), windows of more than 256 tokens (float32: 64), head dims above 64,
a mask that requires grad.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INT32_LIMIT,
    INTERPRET,
    cast_to,
    device_reasons,
    new_output,
    next_pow2,
    resolve_backend,
    size_reasons,
    tl,
    triton,
)
from ._library import register

OP = "swin_window_attention"

#: Largest window (tokens) and head dim the kernels take (register tiles; see ``_tiles``).
MAX_WINDOW_TOKENS = 256
MAX_HEAD_DIM = 64
MAX_FP32_WINDOW_TOKENS = 64

#: Triton path vs the fp32 reference, ``atol = rel * max|reference|`` of each compared tensor (``rtol`` as
#: usual). fp32: exact fp32 dots (``ieee``) summed in another order. bf16/fp16: the kernels round P and dS
#: to the input dtype before their dots (as flash attention and timm's autocast math do) and store in
#: the input dtype, while the reference keeps fp32 until its output. Worst measured over the cases of
#: ``tests/test_window_attention_triton.py`` under the interpreter (CPU), out / dqkv / dtable: fp32
#: 4.3e-7 / 3.0e-7 / 3.8e-7, bf16 3.9e-3 / 6.3e-3 / 1.9e-3, fp16 6.1e-4 / 7.6e-4 / 1.7e-4 (of the max);
#: the bounds are ~2.5x those (fp32: ~10x). Not yet measured on a GPU.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, rel=4e-6),
    torch.bfloat16: dict(rtol=1.6e-2, rel=1.6e-2),
    torch.float16: dict(rtol=2e-3, rel=2e-3),
}

# ----------------------------------------------------------------------------------------------------
# kernels

if HAS_TRITON:
    from ._common import _INTERPRETED

    _LOG2E = tl.constexpr(1.4426950408889634)
    _SHIFT_MASK_LOG2 = tl.constexpr(-100.0 * 1.4426950408889634)  # timm's -100, in log2 units

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` with fp32 accumulation. Triton's interpreter gets bf16 dots wrong (measured: garbage),
        so interpreted operands are widened to fp32 first (bf16/fp16 products are exact in fp32)."""
        if _INTERPRETED:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, input_precision="ieee")
        else:
            acc = tl.dot(a, b)
        return acc

    @triton.jit
    def _tokens(g, pos, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH: tl.constexpr, WW: tl.constexpr):
        """Tokens ``pos`` (window positions, row-major) of window ``g`` = ``b*NW + wy*NWX + wx``.

        Returns the image ``b``, the token's row/col ``(ty, tx)`` in the un-shifted (padded) grid, whether
        it is a real token (not padding) and its shift-mask region. A real token at shifted-grid ``(sy, sx)``
        comes from ``((sy + SY) mod H, (sx + SX) mod W)`` (the roll); a padded one (``sy >= H`` or
        ``sx >= W``) is not rolled: it stays at ``(sy, sx)`` of the padded buffer. Regions are
        timm's slices ``[0, HP-WH) [HP-WH, HP-MY) [HP-MY, HP)`` per axis (MY = 0: no mask on that axis).
        """
        b = g // NW
        w = g - b * NW
        wy = w // NWX
        wx = w - wy * NWX
        py = pos // WW
        px = pos - py * WW
        sy = wy * WH + py
        sx = wx * WW + px
        inside = (sy < H) & (sx < W)
        ty = sy + SY
        ty = tl.where(ty >= H, ty - H, ty)
        ty = tl.where(inside, ty, sy)
        tx = sx + SX
        tx = tl.where(tx >= W, tx - W, tx)
        tx = tl.where(inside, tx, sx)
        real = (pos < WH * WW) & inside
        ry = (sy >= HP - WH).to(tl.int32) + (sy >= HP - MY).to(tl.int32)
        rx = (sx >= WP - WW).to(tl.int32) + (sx >= WP - MX).to(tl.int32)
        return b, ty, tx, real, ry * 3 + rx

    @triton.jit
    def _rel_bias(table_ptr, qpos, kpos, valid, h, t_s0, t_s1, WH: tl.constexpr, WW: tl.constexpr):
        """``table[rel_index(q, k), h]`` in log2 units for broadcastable query/key position tiles."""
        qy = qpos // WW
        ky = kpos // WW
        idx = (qy - ky + WH - 1) * (2 * WW - 1) + (qpos - qy * WW) - (kpos - ky * WW) + WW - 1
        bias = tl.load(table_ptr + idx * t_s0 + h * t_s1, mask=valid, other=0.0).to(tl.float32)
        return bias * _LOG2E

    #: Geometry integers change with every stage and batch; specialising on them (== 1, % 16) would only
    #: multiply the compiled variants. Strides and C stay specialised (alignment, vector loads).
    _GEOMETRY_ARGS = ["G", "NW", "NWX", "H", "W", "HP", "WP", "SY", "SX", "MY", "MX", "NH", "WPP", "NM"]

    @triton.jit(do_not_specialize=_GEOMETRY_ARGS)
    def _fwd_kernel(
        qkv_ptr, table_ptr, mask_ptr, out_ptr, lse_ptr,
        G, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, C, NH, WPP, NM, qk_scale,
        s_b, s_y, s_x, s_c,
        o_sb, o_sy, o_sx,
        t_s0, t_s1, m_s0, m_s1, m_s2,
        WH: tl.constexpr, WW: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, NP: tl.constexpr, N_QB: tl.constexpr,
        SHIFT: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (chunk of ``WPP`` windows x query block, head): ``BM`` queries against all ``NP`` keys."""
        N: tl.constexpr = WH * WW
        pid = tl.program_id(0)
        h = tl.program_id(1)
        qb = pid % N_QB
        g0 = (pid // N_QB) * WPP
        rows = qb * BM + tl.arange(0, BM)
        cols = tl.arange(0, NP)
        d = tl.arange(0, BD)
        rvalid = rows < N
        cvalid = cols < N
        dmask = d < HD
        valid = rvalid[:, None] & cvalid[None, :]
        bias = _rel_bias(table_ptr, rows[:, None], cols[None, :], valid, h, t_s0, t_s1, WH, WW)
        bias = tl.where(cvalid[None, :], bias, float("-inf"))  # keys beyond the window
        hoff = (h * HD + d) * s_c
        n_it = tl.minimum(WPP, G - g0)
        it = 0
        while it < n_it:  # a while loop: triton 3.6's interpreter cannot take a runtime bound in range()
            g = g0 + it
            b, ry, rx, rreal, rreg = _tokens(g, rows, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH, WW)
            _, cy, cx, _, creg = _tokens(g, cols, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH, WW)
            rtok = b * s_b + ry * s_y + rx * s_x
            ctok = b * s_b + cy * s_y + cx * s_x
            q = tl.load(qkv_ptr + rtok[:, None] + hoff[None, :], mask=rvalid[:, None] & dmask[None, :], other=0.0)
            kv_mask = cvalid[:, None] & dmask[None, :]
            k = tl.load(qkv_ptr + ctok[:, None] + (C * s_c + hoff)[None, :], mask=kv_mask, other=0.0)
            v = tl.load(qkv_ptr + ctok[:, None] + (2 * C * s_c + hoff)[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale + bias
            if SHIFT:
                s = tl.where(rreg[:, None] == creg[None, :], s, s + _SHIFT_MASK_LOG2)
            if HAS_MASK:
                am = tl.load(mask_ptr + (g % NM) * m_s0 + rows[:, None] * m_s1 + cols[None, :] * m_s2,
                             mask=valid, other=0.0)
                s += am.to(tl.float32) * _LOG2E
            m = tl.max(s, axis=1)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, axis=1)
            o = _dot(cast_to(p, qkv_ptr.dtype.element_ty), v, IEEE) / l[:, None]
            otok = b * o_sb + ry * o_sy + rx * o_sx
            tl.store(out_ptr + otok[:, None] + (h * HD + d)[None, :], cast_to(o, out_ptr.dtype.element_ty),
                     mask=rreal[:, None] & dmask[None, :])
            tl.store(lse_ptr + (g * NH + h) * N + rows, m + tl.log2(l), mask=rvalid)
            it += 1

    @triton.jit(do_not_specialize=_GEOMETRY_ARGS)
    def _bwd_dq_kernel(
        qkv_ptr, table_ptr, mask_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
        G, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, C, NH, WPP, NM, qk_scale, sm_scale,
        s_b, s_y, s_x, s_c,
        o_sb, o_sy, o_sx,
        g_sb, g_sy, g_sx, g_sc,
        d_sb, d_sy, d_sx,
        t_s0, t_s1, m_s0, m_s1, m_s2,
        WH: tl.constexpr, WW: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, NP: tl.constexpr, N_QB: tl.constexpr,
        SHIFT: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Windows of more than 64 tokens: dq of ``BM`` queries (all keys) and ``rowsum(dO * O)`` for the dk/dv kernel."""
        N: tl.constexpr = WH * WW
        pid = tl.program_id(0)
        h = tl.program_id(1)
        qb = pid % N_QB
        g0 = (pid // N_QB) * WPP
        rows = qb * BM + tl.arange(0, BM)
        cols = tl.arange(0, NP)
        d = tl.arange(0, BD)
        rvalid = rows < N
        cvalid = cols < N
        dmask = d < HD
        valid = rvalid[:, None] & cvalid[None, :]
        bias = _rel_bias(table_ptr, rows[:, None], cols[None, :], valid, h, t_s0, t_s1, WH, WW)
        bias = tl.where(cvalid[None, :], bias, float("-inf"))
        hoff = (h * HD + d) * s_c
        n_it = tl.minimum(WPP, G - g0)
        it = 0
        while it < n_it:
            g = g0 + it
            b, ry, rx, rreal, rreg = _tokens(g, rows, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH, WW)
            _, cy, cx, _, creg = _tokens(g, cols, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH, WW)
            rtok = b * s_b + ry * s_y + rx * s_x
            ctok = b * s_b + cy * s_y + cx * s_x
            rmask = rvalid[:, None] & dmask[None, :]
            real_mask = rreal[:, None] & dmask[None, :]
            q = tl.load(qkv_ptr + rtok[:, None] + hoff[None, :], mask=rmask, other=0.0)
            kv_mask = cvalid[:, None] & dmask[None, :]
            k = tl.load(qkv_ptr + ctok[:, None] + (C * s_c + hoff)[None, :], mask=kv_mask, other=0.0)
            v = tl.load(qkv_ptr + ctok[:, None] + (2 * C * s_c + hoff)[None, :], mask=kv_mask, other=0.0)
            o = tl.load(out_ptr + (b * o_sb + ry * o_sy + rx * o_sx)[:, None] + (h * HD + d)[None, :],
                        mask=real_mask, other=0.0).to(tl.float32)
            do = tl.load(dout_ptr + (b * g_sb + ry * g_sy + rx * g_sx)[:, None] + ((h * HD + d) * g_sc)[None, :],
                         mask=real_mask, other=0.0)
            delta = tl.sum(o * do.to(tl.float32), axis=1)
            tl.store(delta_ptr + (g * NH + h) * N + rows, delta, mask=rvalid)
            lse = tl.load(lse_ptr + (g * NH + h) * N + rows, mask=rvalid, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale + bias
            if SHIFT:
                s = tl.where(rreg[:, None] == creg[None, :], s, s + _SHIFT_MASK_LOG2)
            if HAS_MASK:
                am = tl.load(mask_ptr + (g % NM) * m_s0 + rows[:, None] * m_s1 + cols[None, :] * m_s2,
                             mask=valid, other=0.0)
                s += am.to(tl.float32) * _LOG2E
            p = tl.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq = _dot(cast_to(ds, qkv_ptr.dtype.element_ty), k, IEEE) * sm_scale
            tl.store(dqkv_ptr + (b * d_sb + ry * d_sy + rx * d_sx)[:, None] + (h * HD + d)[None, :],
                     cast_to(dq, dqkv_ptr.dtype.element_ty), mask=rmask)
            it += 1

    @triton.jit(do_not_specialize=_GEOMETRY_ARGS)
    def _bwd_kv_kernel(
        qkv_ptr, table_ptr, mask_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, part_ptr,
        G, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, C, NH, WPP, NM, qk_scale, sm_scale,
        s_b, s_y, s_x, s_c,
        o_sb, o_sy, o_sx,
        g_sb, g_sy, g_sx, g_sc,
        d_sb, d_sy, d_sx,
        t_s0, t_s1, m_s0, m_s1, m_s2,
        WH: tl.constexpr, WW: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
        BN: tl.constexpr, NP: tl.constexpr, N_KB: tl.constexpr,
        SHIFT: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (chunk of windows x key block, head): dk, dv of ``BN`` keys against all ``NP`` queries,
        computed transposed (rows = keys), and the chunk's bias-gradient partial ``sum(dS)`` of those
        columns. ``FUSED`` (the whole window is one key block): also ``rowsum(dO * O)`` and dq."""
        N: tl.constexpr = WH * WW
        pid = tl.program_id(0)
        h = tl.program_id(1)
        kb = pid % N_KB
        chunk = pid // N_KB
        g0 = chunk * WPP
        rows = kb * BN + tl.arange(0, BN)  # keys
        cols = tl.arange(0, NP)  # queries
        d = tl.arange(0, BD)
        rvalid = rows < N
        cvalid = cols < N
        dmask = d < HD
        valid = rvalid[:, None] & cvalid[None, :]
        bias = _rel_bias(table_ptr, cols[None, :], rows[:, None], valid, h, t_s0, t_s1, WH, WW)
        bias = tl.where(valid, bias, float("-inf"))  # P^T is zero outside the window
        dbias = tl.zeros([BN, NP], dtype=tl.float32)
        hoff = (h * HD + d) * s_c
        n_it = tl.minimum(WPP, G - g0)
        it = 0
        while it < n_it:
            g = g0 + it
            b, ky, kx, _, kreg = _tokens(g, rows, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH, WW)
            _, qy, qx, qreal, qreg = _tokens(g, cols, NW, NWX, H, W, HP, WP, SY, SX, MY, MX, WH, WW)
            ktok = b * s_b + ky * s_y + kx * s_x
            qtok = b * s_b + qy * s_y + qx * s_x
            kmask = rvalid[:, None] & dmask[None, :]
            qmask = cvalid[:, None] & dmask[None, :]
            real_mask = qreal[:, None] & dmask[None, :]
            k = tl.load(qkv_ptr + ktok[:, None] + (C * s_c + hoff)[None, :], mask=kmask, other=0.0)
            v = tl.load(qkv_ptr + ktok[:, None] + (2 * C * s_c + hoff)[None, :], mask=kmask, other=0.0)
            q = tl.load(qkv_ptr + qtok[:, None] + hoff[None, :], mask=qmask, other=0.0)
            do = tl.load(dout_ptr + (b * g_sb + qy * g_sy + qx * g_sx)[:, None] + ((h * HD + d) * g_sc)[None, :],
                         mask=real_mask, other=0.0)
            lse = tl.load(lse_ptr + (g * NH + h) * N + cols, mask=cvalid, other=0.0)
            if FUSED:
                o = tl.load(out_ptr + (b * o_sb + qy * o_sy + qx * o_sx)[:, None] + (h * HD + d)[None, :],
                            mask=real_mask, other=0.0).to(tl.float32)
                delta = tl.sum(o * do.to(tl.float32), axis=1)
            else:
                delta = tl.load(delta_ptr + (g * NH + h) * N + cols, mask=cvalid, other=0.0)
            s = _dot(k, tl.trans(q), IEEE) * qk_scale + bias
            if SHIFT:
                s = tl.where(kreg[:, None] == qreg[None, :], s, s + _SHIFT_MASK_LOG2)
            if HAS_MASK:
                am = tl.load(mask_ptr + (g % NM) * m_s0 + cols[None, :] * m_s1 + rows[:, None] * m_s2,
                             mask=valid, other=0.0)
                s += am.to(tl.float32) * _LOG2E
            p = tl.exp2(s - lse[None, :])  # P^T
            dv = _dot(cast_to(p, qkv_ptr.dtype.element_ty), do, IEEE)
            dp = _dot(v, tl.trans(do), IEEE)  # dP^T
            ds = p * (dp - delta[None, :])  # dS^T
            dbias += ds
            ds_lo = cast_to(ds, qkv_ptr.dtype.element_ty)
            dk = _dot(ds_lo, q, IEEE) * sm_scale
            dtok = b * d_sb + ky * d_sy + kx * d_sx
            tl.store(dqkv_ptr + dtok[:, None] + (C + h * HD + d)[None, :], cast_to(dk, dqkv_ptr.dtype.element_ty),
                     mask=kmask)
            tl.store(dqkv_ptr + dtok[:, None] + (2 * C + h * HD + d)[None, :],
                     cast_to(dv, dqkv_ptr.dtype.element_ty), mask=kmask)
            if FUSED:
                dq = _dot(tl.trans(ds_lo), k, IEEE) * sm_scale
                tl.store(dqkv_ptr + (b * d_sb + qy * d_sy + qx * d_sx)[:, None] + (h * HD + d)[None, :],
                         cast_to(dq, dqkv_ptr.dtype.element_ty), mask=qmask)
            it += 1
        tl.store(part_ptr + ((chunk * NH + h) * N + cols[None, :]) * N + rows[:, None], dbias, mask=valid)


# ----------------------------------------------------------------------------------------------------
# geometry, tiles, traffic


@dataclass(frozen=True)
class Geometry:
    """The shapes of one call (all ints): batch, real and padded grids, window, shift, heads."""

    B: int
    H: int
    W: int
    Hp: int
    Wp: int
    wh: int
    ww: int
    sh: int
    sw: int
    heads: int
    head_dim: int

    @property
    def N(self) -> int:
        return self.wh * self.ww

    @property
    def C(self) -> int:
        return self.heads * self.head_dim

    @property
    def windows_per_image(self) -> int:
        return (self.Hp // self.wh) * (self.Wp // self.ww)

    @property
    def G(self) -> int:
        return self.B * self.windows_per_image

    @property
    def table_rows(self) -> int:
        return (2 * self.wh - 1) * (2 * self.ww - 1)


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one window size / head dim / dtype (see the module docstring and :func:`tiles`)."""

    NP: int  # keys (forward, dq) / queries (dk/dv) per tile: the whole window, padded to a power of 2
    BM: int  # queries per forward / dq program
    BN: int  # keys per dk/dv program
    BD: int  # head dim, padded to a power of 2 (>= 16 for tl.dot)
    fused: bool  # one backward kernel (the window is one key block)
    fwd_warps: int
    bwd_warps: int

    def blocks(self, N: int) -> tuple[int, int]:
        """(query blocks, key blocks) of a window of ``N`` tokens."""
        return (-(-N // self.BM), 1 if self.fused else -(-N // self.BN))


#: Compute capability the tiles are planned for when the tensors are not on a GPU (the interpreter, the
#: compile check's recording): see :func:`planned_for`.
_PLAN_CAPABILITY = (9, 0)


@contextlib.contextmanager
def planned_for(capability: tuple[int, int]):
    """Plan tiles for ``capability`` while tensors are not on a GPU (``kernel_check`` records each plan)."""
    global _PLAN_CAPABILITY
    old, _PLAN_CAPABILITY = _PLAN_CAPABILITY, tuple(capability)
    try:
        yield
    finally:
        _PLAN_CAPABILITY = old


def plan_capability(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return _PLAN_CAPABILITY


def tiles(N: int, head_dim: int, dtype: torch.dtype = torch.bfloat16, capability: tuple[int, int] = (9, 0)) -> Tiles:
    """Block sizes, chosen from the sm_90/sm_80 compile (``ptxas -v`` through ``python -m
    simmim_fast.kernel_check``: no spills for the variants the capability check accepts).

    16-bit inputs on sm_90 and newer: the whole window in one tile up to 64 tokens (fused backward),
    else 16 queries (keys) against all keys (queries); 4 warps forward, 8 backward. On older GPUs (sm_80:
    the fused backward spills there from head dim 32 / 49 tokens on) and for float32 inputs the split
    backward (dq kernel, then dk/dv) with 16-row tiles at every window size; float32 multiplies with FMA
    dots (``input_precision="ieee"``: exact fp32, no TF32) whose operands take far more registers: 8 warps,
    dk/dv tiles of 32 keys up to head dim 32 and of 16 above (each the one of 16/32 that compiles without
    spills with both triton 3.6 and 3.8; ptxas' choices are not monotonic in the tile size here).
    """
    NP = max(16, next_pow2(N))
    BD = max(16, next_pow2(head_dim))
    if dtype == torch.float32:
        return Tiles(NP, 16, 32 if BD <= 32 else 16, BD, False, 8, 8)
    if NP <= 64 and tuple(capability) >= (9, 0):
        return Tiles(NP, NP, NP, BD, True, 4, 8)
    return Tiles(NP, 16, 16, BD, False, 4, 8)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 0


def windows_per_program(G: int, items_per_window: int, device: torch.device, *, programs_per_sm: int) -> int:
    """Windows each program loops over. On CUDA enough programs to fill the GPU
    (``programs_per_sm`` per SM; a chunk amortises the in-kernel bias gather and, in the backward, sets
    the number of bias-gradient partials); at most 64. Interpreted (CPU): 3, so the tests run the
    window loop, several chunks and a partial last chunk."""
    sms = _sm_count(device)
    if sms == 0:
        return max(1, min(3, G))
    target = programs_per_sm * sms
    return max(1, min(64, -(-G * items_per_window // target)))


def kernel_traffic(geo: Geometry, *, dtype: torch.dtype, table_dtype: torch.dtype = torch.float32,
                   has_mask: bool = False, mask_dtype: torch.dtype = torch.float32, sms: int = 132,
                   capability: tuple[int, int] = (9, 0)) -> dict:
    """Bytes the Triton kernels load and store for one call of ``geo``, and the attention FLOPs.

    ``issued`` counts every load/store the kernels execute (masked-off lanes excluded): the
    large-window path re-reads K/V (dq kernel) and Q/dO (dk/dv kernel) once per block, which L2 may
    serve. ``compulsory`` counts each tensor element once: the traffic an ideal cache would leave.
    ``sms`` fixes the windows per program, hence the bias-gradient partials (132: H100/H200).
    FLOPs: forward ``4 N^2 hd`` per window and head, backward ``10 N^2 hd`` (recompute QK^T, dV, dP,
    dQ, dK; the large-window path recomputes QK^T and dP once more, not counted), padding excluded.
    """
    e = torch.empty((), dtype=dtype).element_size()
    et = torch.empty((), dtype=table_dtype).element_size()
    em = torch.empty((), dtype=mask_dtype).element_size()
    t = tiles(geo.N, geo.head_dim, dtype, capability)
    N, hd, nH, G, C = geo.N, geo.head_dim, geo.heads, geo.G, geo.C
    n_qb, n_kb = t.blocks(N)
    real = geo.H * geo.W / (geo.Hp * geo.Wp)  # fraction of window tokens that are real
    padded_tokens, real_tokens = geo.B * geo.Hp * geo.Wp, geo.B * geo.H * geo.W
    wh_items = G * nH  # (window, head) pairs

    def chunks(items_per_window: int, per_sm: int) -> int:
        wpp = max(1, min(64, -(-G * items_per_window // (per_sm * sms)))) if sms else max(1, min(3, G))
        return -(-G // wpp)

    c_f, c_b = chunks(nH * n_qb, 16), chunks(nH * n_kb, 8)
    vec = N * hd  # one head's q (or k, v, o, do) of one window
    mask_tile = N * N * em if has_mask else 0
    fwd_issued = (wh_items * (vec * e + n_qb * 2 * vec * e + real * vec * e + N * 4 + mask_tile)
                  + c_f * nH * N * N * et)
    fwd_comp = 3 * padded_tokens * C * e + real_tokens * C * e + G * nH * N * 4 + geo.table_rows * nH * et
    part = c_b * nH * N * N * 4
    stage2 = part + nH * N * N * 4 * 2 + geo.table_rows * nH * 4  # sum over chunks, gather-sum to the table
    if t.fused:
        bwd_issued = wh_items * (3 * vec * e + 2 * real * vec * e + N * 4 + 3 * vec * e + mask_tile)
        bwd_issued += c_b * nH * N * N * et + part + stage2
        delta_bytes = 0
    else:
        dq = wh_items * (vec * e + 2 * real * vec * e + n_qb * 2 * vec * e + 2 * N * 4 + vec * e + mask_tile)
        kv = wh_items * (2 * vec * e + n_kb * (vec * e + real * vec * e + 2 * N * 4) + 2 * vec * e + mask_tile)
        bwd_issued = dq + kv + (chunks(nH * n_qb, 8) + c_b) * nH * N * N * et + part + stage2
        delta_bytes = 2 * G * nH * N * 4
    bwd_comp = (3 * padded_tokens * C * e + 2 * real_tokens * C * e + G * nH * N * 4 + 3 * padded_tokens * C * e
                + geo.table_rows * nH * et + 2 * part + delta_bytes + geo.table_rows * nH * 4)
    flops_unit = G * nH * N * N * hd
    return {
        "forward": {"issued_bytes": int(fwd_issued), "compulsory_bytes": int(fwd_comp), "flops": 4 * flops_unit},
        "backward": {"issued_bytes": int(bwd_issued), "compulsory_bytes": int(bwd_comp), "flops": 10 * flops_unit,
                     "bias_grad_partial_bytes": int(part), "bias_grad_partials": c_b},
        "tiles": dict(NP=t.NP, BM=t.BM, BN=t.BN, BD=t.BD, fused_backward=t.fused),
    }


# ----------------------------------------------------------------------------------------------------
# host code (registered twice with torch.library, see _library.py)


def _geometry_of(qkv4: torch.Tensor, num_heads, window_h, window_w, shift_h, shift_w, height, width) -> Geometry:
    B, Hq, Wq, C3 = qkv4.shape
    return Geometry(B, height, width, Hq, Wq, window_h, window_w, shift_h, shift_w, num_heads, C3 // 3 // num_heads)


def _launch_args(geo: Geometry, table, attn_mask):
    """The runtime arguments every kernel shares, in their order."""
    has_mask = attn_mask is not None
    m = attn_mask if has_mask else table  # any pointer: never read without HAS_MASK
    m_strides = attn_mask.stride() if has_mask else (0, 0, 0)
    head = [
        geo.G, geo.windows_per_image, geo.Wp // geo.ww, geo.H, geo.W, geo.Hp, geo.Wp,
        geo.sh % geo.H, geo.sw % geo.W, geo.sh, geo.sw, geo.C, geo.heads,
    ]
    return m, m_strides, head


def _forward_impl(launch, qkv, table, attn_mask, num_heads, window_h, window_w, shift_h, shift_w, height, width,
                  scale):
    geo = _geometry_of(qkv, num_heads, window_h, window_w, shift_h, shift_w, height, width)
    out = new_output((geo.B, geo.H, geo.W, geo.C), dtype=qkv.dtype, device=qkv.device)
    lse = new_output((geo.G, geo.heads, geo.N), dtype=torch.float32, device=qkv.device)
    if out.numel() == 0:
        return out, lse
    t = tiles(geo.N, geo.head_dim, qkv.dtype, plan_capability(qkv.device))
    n_qb = -(-geo.N // t.BM)
    wpp = windows_per_program(geo.G, geo.heads * n_qb, qkv.device, programs_per_sm=16)
    m, m_strides, head = _launch_args(geo, table, attn_mask)
    nm = attn_mask.shape[0] if attn_mask is not None else 1
    grid = (-(-geo.G // wpp) * n_qb, geo.heads)
    launch(_fwd_kernel)[grid](
        qkv, table, m, out, lse,
        *head, wpp, nm, float(scale) * 1.4426950408889634,
        *qkv.stride(), *out.stride()[:3], *table.stride(), *m_strides,
        WH=geo.wh, WW=geo.ww, HD=geo.head_dim, BD=t.BD, BM=t.BM, NP=t.NP, N_QB=n_qb,
        SHIFT=bool(geo.sh or geo.sw), HAS_MASK=attn_mask is not None, IEEE=qkv.dtype == torch.float32,
        num_warps=t.fwd_warps,
    )
    return out, lse


def _forward_fake(
    qkv: torch.Tensor, table: torch.Tensor, attn_mask: Optional[torch.Tensor], num_heads: int, window_h: int,
    window_w: int, shift_h: int, shift_w: int, height: int, width: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geometry_of(qkv, num_heads, window_h, window_w, shift_h, shift_w, height, width)
    return (qkv.new_empty((geo.B, geo.H, geo.W, geo.C)),
            qkv.new_empty((geo.G, geo.heads, geo.N), dtype=torch.float32))


def table_gradient(dbias: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """``(nH, N, N)`` bias gradient -> ``(T, nH)`` table gradient, summed in a fixed order (deterministic).

    Entry ``t = (dy, dx)`` of the table collects the pairs ``(i, j)`` with ``iy - jy = dy - (Wh-1)`` and
    ``ix - jx = dx - (Ww-1)``: for each query ``i`` at most one key, found by index arithmetic; the gather
    ``(nH, T, N)`` is summed over the queries.
    """
    nH, N, _ = dbias.shape
    dev = dbias.device
    T = (2 * window_h - 1) * (2 * window_w - 1)
    t = torch.arange(T, device=dev)
    oy = t // (2 * window_w - 1) - (window_h - 1)
    ox = t % (2 * window_w - 1) - (window_w - 1)
    i = torch.arange(N, device=dev)
    jy = (i // window_w)[None, :] - oy[:, None]
    jx = (i % window_w)[None, :] - ox[:, None]
    ok = (jy >= 0) & (jy < window_h) & (jx >= 0) & (jx < window_w)
    flat = torch.where(ok, i[None, :] * N + jy * window_w + jx, N * N)  # (T, N); N*N reads a zero
    padded = torch.cat([dbias.reshape(nH, N * N), dbias.new_zeros(nH, 1)], dim=1)
    return padded[:, flat].sum(-1).t()


def _backward_impl(launch, grad, qkv, table, attn_mask, out, lse, num_heads, window_h, window_w, shift_h, shift_w,
                   height, width, scale):
    geo = _geometry_of(qkv, num_heads, window_h, window_w, shift_h, shift_w, height, width)
    dqkv = new_output(tuple(qkv.shape), dtype=qkv.dtype, device=qkv.device)
    if qkv.numel() == 0:
        return dqkv, torch.zeros_like(table)
    grad = grad.to(qkv.dtype)
    t = tiles(geo.N, geo.head_dim, qkv.dtype, plan_capability(qkv.device))
    n_qb, n_kb = t.blocks(geo.N)
    m, m_strides, head = _launch_args(geo, table, attn_mask)
    nm = attn_mask.shape[0] if attn_mask is not None else 1
    common = dict(WH=geo.wh, WW=geo.ww, HD=geo.head_dim, BD=t.BD, NP=t.NP, SHIFT=bool(geo.sh or geo.sw),
                  HAS_MASK=attn_mask is not None, IEEE=qkv.dtype == torch.float32, num_warps=t.bwd_warps)
    strides = (*qkv.stride(), *out.stride()[:3], *grad.stride(), *dqkv.stride()[:3], *table.stride(), *m_strides)
    qk_scale, sm_scale = float(scale) * 1.4426950408889634, float(scale)
    delta = lse  # any fp32 pointer: the fused kernel computes rowsum(dO * O) itself
    if not t.fused:
        delta = new_output((geo.G, geo.heads, geo.N), dtype=torch.float32, device=qkv.device)
        wpp_q = windows_per_program(geo.G, geo.heads * n_qb, qkv.device, programs_per_sm=8)
        launch(_bwd_dq_kernel)[(-(-geo.G // wpp_q) * n_qb, geo.heads)](
            qkv, table, m, out, grad, lse, delta, dqkv,
            *head, wpp_q, nm, qk_scale, sm_scale, *strides,
            BM=t.BM, N_QB=n_qb, **common,
        )
    wpp = windows_per_program(geo.G, geo.heads * n_kb, qkv.device, programs_per_sm=8)
    n_chunks = -(-geo.G // wpp)
    part = new_output((n_chunks, geo.heads, geo.N, geo.N), dtype=torch.float32, device=qkv.device)
    launch(_bwd_kv_kernel)[(n_chunks * n_kb, geo.heads)](
        qkv, table, m, out, grad, lse, delta, dqkv, part,
        *head, wpp, nm, qk_scale, sm_scale, *strides,
        BN=t.BN, N_KB=n_kb, FUSED=t.fused, **common,
    )
    dtable = table_gradient(part.sum(0), geo.wh, geo.ww)
    return dqkv, dtable.to(table.dtype).contiguous()


def _backward_fake(
    grad: torch.Tensor, qkv: torch.Tensor, table: torch.Tensor, attn_mask: Optional[torch.Tensor],
    out: torch.Tensor, lse: torch.Tensor, num_heads: int, window_h: int, window_w: int, shift_h: int,
    shift_w: int, height: int, width: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qkv.new_empty(qkv.shape), table.new_empty(table.shape)


_BWD = register("swin_window_attention_backward", _backward_impl, _backward_fake)


def _autograd(traceable: bool):
    bwd_op = _BWD.traceable if traceable else _BWD.opaque

    def setup_context(ctx, inputs, output):
        qkv, table, attn_mask, *geometry = inputs
        out, lse = output
        ctx.save_for_backward(qkv, table, attn_mask, out, lse)
        ctx.geometry = geometry
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad, grad_lse):
        qkv, table, attn_mask, out, lse = ctx.saved_tensors
        dqkv, dtable = bwd_op(grad, qkv, table, attn_mask, out, lse, *ctx.geometry)
        return (dqkv, dtable, None) + (None,) * len(ctx.geometry)

    return setup_context, backward


_FWD = register("swin_window_attention", _forward_impl, _forward_fake, autograd=_autograd)


# ----------------------------------------------------------------------------------------------------
# argument checks and capability


def _pair(name: str, value, *, low: int) -> tuple[int, int]:
    items = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if any(v < low for v in items):
        raise ValueError(f"{name}: expected values >= {low}, got {value!r}")
    return items


def geometry(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size,
    shift_size=0,
    resolution=None,
    attn_mask: Optional[torch.Tensor] = None,
) -> Geometry:
    """Check the arguments of :func:`swin_window_attention` (both backends); return their geometry.

    Raises ``TypeError``/``ValueError`` naming the argument and what was expected."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv: expected a floating-point tensor, got {qkv.dtype}")
    if not isinstance(bias_table, torch.Tensor) or not bias_table.is_floating_point():
        raise TypeError(f"bias_table: expected a floating-point torch.Tensor, got "
                        f"{getattr(bias_table, 'dtype', type(bias_table).__name__)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    wh, ww = _pair("window_size", window_size, low=1)
    sh, sw = _pair("shift_size", shift_size, low=0)
    if sh >= wh or sw >= ww:
        raise ValueError(f"shift_size: expected 0 <= shift < window {(wh, ww)} per axis, got {(sh, sw)}")
    if qkv.dim() == 6:
        if qkv.shape[3] != 3 or qkv.shape[4] != num_heads:
            raise ValueError(f"qkv: expected (B, H, W, 3, {num_heads}, head_dim), got {tuple(qkv.shape)}")
        grid = tuple(qkv.shape[1:3])
    elif qkv.dim() == 4:
        grid = tuple(qkv.shape[1:3])
    elif qkv.dim() == 3:
        if resolution is None:
            raise ValueError("resolution: required for 3-D qkv (B, L, 3*C): the token grid (H, W)")
        H, W = _pair("resolution", resolution, low=1)
        grid = (-(-H // wh) * wh, -(-W // ww) * ww)
        if qkv.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"qkv: 3-D qkv needs L = {grid[0]}*{grid[1]} tokens (resolution {(H, W)} padded to the "
                             f"window {(wh, ww)}), got L = {qkv.shape[1]}")
    else:
        raise ValueError(f"qkv: expected (B, H, W, 3*C), (B, H, W, 3, nH, hd) or (B, L, 3*C), got {tuple(qkv.shape)}")
    c3 = qkv.shape[-1] if qkv.dim() != 6 else 3 * qkv.shape[4] * qkv.shape[5]
    if c3 == 0 or c3 % (3 * num_heads):
        raise ValueError(f"qkv: last dimension {c3} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    H, W = _pair("resolution", resolution, low=1) if resolution is not None else grid
    expected = (-(-H // wh) * wh, -(-W // ww) * ww)
    if grid != expected:
        raise ValueError(
            f"qkv: token grid {grid} must be the resolution {(H, W)} rounded up to multiples of the window "
            f"{(wh, ww)}, i.e. {expected} (zero-pad the normed tokens to {expected} before the qkv projection "
            f"and pass resolution={(H, W)})")
    T = (2 * wh - 1) * (2 * ww - 1)
    if tuple(bias_table.shape) != (T, num_heads):
        raise ValueError(f"bias_table: expected ((2*{wh}-1)*(2*{ww}-1), num_heads) = {(T, num_heads)}, "
                         f"got {tuple(bias_table.shape)}")
    geo = Geometry(qkv.shape[0], H, W, grid[0], grid[1], wh, ww, sh, sw, num_heads, c3 // 3 // num_heads)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected None or a floating additive mask, got "
                            f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
        N = geo.N
        if attn_mask.dim() != 3 or attn_mask.shape[1:] != (N, N) or attn_mask.shape[0] < 1:
            raise ValueError(f"attn_mask: expected (num_masks, {N}, {N}), got {tuple(attn_mask.shape)}")
        if geo.G % attn_mask.shape[0]:
            raise ValueError(f"attn_mask: {attn_mask.shape[0]} masks do not divide the {geo.G} windows "
                             f"(batch x windows per image)")
    return geo


def capability_reasons(geo: Geometry, *, dtype: torch.dtype, table_dtype: torch.dtype, dropout_p: float = 0.0,
                       cosine: bool = False, mask_requires_grad: bool = False) -> list[str]:
    """The reasons that depend on the geometry and dtypes only (no tensor): dtype, sizes, features."""
    reasons = []
    if dtype not in FLOAT_DTYPES:
        reasons.append(f"qkv dtype {dtype} (the kernels take float32, bfloat16, float16)")
    if table_dtype not in FLOAT_DTYPES:
        reasons.append(f"bias_table dtype {table_dtype} (the kernels take float32, bfloat16, float16)")
    if geo.N > MAX_WINDOW_TOKENS:
        reasons.append(f"window {geo.wh}x{geo.ww} = {geo.N} tokens is more than the kernels' {MAX_WINDOW_TOKENS}")
    if geo.head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {geo.head_dim} is more than the kernels' {MAX_HEAD_DIM}")
    if dtype == torch.float32 and geo.N > MAX_FP32_WINDOW_TOKENS:
        reasons.append(f"float32 with a window of {geo.N} tokens (more than {MAX_FP32_WINDOW_TOKENS}): the fp32 "
                       "(FMA) dot tiles spill registers on sm_80/sm_90; use bf16/fp16 autocast")
    for name, n in (("qkv / its gradient", geo.B * geo.Hp * geo.Wp * 3 * geo.C), ("output", geo.B * geo.H * geo.W * geo.C),
                    ("log-sum-exp buffer", geo.G * geo.heads * geo.N)):
        if n > INT32_LIMIT:
            reasons.append(f"{name} has {n} elements, more than the kernels' int32 indexing allows ({INT32_LIMIT})")
    if dropout_p > 0:
        reasons.append(f"attention dropout p={dropout_p} in training (the kernels have no dropout)")
    if cosine:
        reasons.append("cosine attention (SwinV2 logit scale / continuous position bias) is not supported")
    if mask_requires_grad:
        reasons.append("attn_mask requires grad (the kernels do not differentiate the mask)")
    return reasons


def not_supported_reasons(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size,
    shift_size=0,
    resolution=None,
    attn_mask: Optional[torch.Tensor] = None,
) -> list[str]:
    """Every reason why the Triton kernels cannot take these inputs (empty: they can)."""
    geo = geometry(qkv, bias_table, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                   resolution=resolution, attn_mask=attn_mask)
    tensors = [qkv, bias_table] + ([attn_mask] if attn_mask is not None else [])
    reasons = device_reasons(*tensors)
    reasons += size_reasons(qkv=qkv, attn_mask=attn_mask)
    reasons += capability_reasons(geo, dtype=qkv.dtype, table_dtype=bias_table.dtype,
                                  mask_requires_grad=attn_mask is not None and attn_mask.requires_grad)
    return reasons


# ----------------------------------------------------------------------------------------------------
# reference


def relative_position_index(window_h: int, window_w: int, device=None) -> torch.Tensor:
    """``(N, N)`` index into the bias table (timm's ``get_relative_position_index``)."""
    ys, xs = torch.meshgrid(torch.arange(window_h, device=device), torch.arange(window_w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + window_h - 1) * (2 * window_w - 1) + (xs[:, None] - xs[None, :] + window_w - 1)


def shift_mask(Hp: int, Wp: int, window: tuple[int, int], shift: tuple[int, int], *, device=None,
               dtype=torch.float32) -> torch.Tensor:
    """timm's ``SwinTransformerBlock.get_attn_mask`` on the padded grid ``(Hp, Wp)``: ``(nW, N, N)``,
    0 within a region and -100 across regions (the slices, ``-0`` included, exactly as timm cuts them)."""
    wh, ww = window
    sh, sw = shift
    img = torch.zeros(Hp, Wp, device=device, dtype=dtype)
    cnt = 0
    for y0, y1 in ((0, -wh), (-wh, -sh), (-sh, None)):
        for x0, x1 in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[y0:y1, x0:x1] = cnt
            cnt += 1
    win = img.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))


def _as_4d(qkv: torch.Tensor, geo: Geometry) -> torch.Tensor:
    if qkv.dim() == 6:
        return qkv.flatten(3)
    if qkv.dim() == 3:
        return qkv.view(qkv.shape[0], geo.Hp, geo.Wp, qkv.shape[-1])
    return qkv


def swin_window_attention_reference(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size,
    shift_size=0,
    resolution=None,
    scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`swin_window_attention` (same signature, ``backend`` ignored): roll,
    partition, timm's math branch in float32 (float64 stays float64), merge, crop, roll back."""
    geo = geometry(qkv, bias_table, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                   resolution=resolution, attn_mask=attn_mask)
    scale = geo.head_dim ** -0.5 if scale is None else float(scale)
    ct = torch.promote_types(qkv.dtype, torch.float32)
    x = _as_4d(qkv, geo).to(ct)
    B, H, W, wh, ww, sh, sw = geo.B, geo.H, geo.W, geo.wh, geo.ww, geo.sh, geo.sw
    shifted = bool(sh or sw)
    if shifted:
        rolled = torch.roll(x[:, :H, :W], shifts=(-sh, -sw), dims=(1, 2))
        if (geo.Hp, geo.Wp) != (H, W):  # padded tokens stay where they are (timm pads after the roll)
            rolled = torch.cat([torch.cat([rolled, x[:, :H, W:]], dim=2), x[:, H:]], dim=1)
        x = rolled
    nH, hd, N, nW = geo.heads, geo.head_dim, geo.N, geo.windows_per_image
    win = x.view(B, geo.Hp // wh, wh, geo.Wp // ww, ww, 3, nH, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = win.reshape(3, B * nW, nH, N, hd).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    index = relative_position_index(wh, ww, device=qkv.device)
    attn = attn + bias_table.to(ct)[index.view(-1)].view(N, N, nH).permute(2, 0, 1).unsqueeze(0)
    if shifted:
        mask = shift_mask(geo.Hp, geo.Wp, (wh, ww), (sh, sw), device=qkv.device, dtype=ct)
        attn = (attn.view(B, nW, nH, N, N) + mask.unsqueeze(1)).view(B * nW, nH, N, N)
    if attn_mask is not None:
        nM = attn_mask.shape[0]
        attn = (attn.view(-1, nM, nH, N, N) + attn_mask.to(ct).unsqueeze(1)).view(B * nW, nH, N, N)
    out = attn.softmax(-1) @ v  # (B*nW, nH, N, hd)
    out = out.view(B, geo.Hp // wh, geo.Wp // ww, nH, wh, ww, hd).permute(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(B, geo.Hp, geo.Wp, nH * hd)[:, :H, :W]
    if shifted:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    out = out.to(qkv.dtype)
    return out.reshape(B, H * W, -1) if qkv.dim() == 3 else out.contiguous()


# ----------------------------------------------------------------------------------------------------
# public API


def swin_window_attention(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size,
    shift_size=0,
    resolution=None,
    scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Swin (shifted-)window multi-head attention from the qkv projection's output, in token layout.

    qkv ``(B, Hq, Wq, 3*C)`` / ``(B, Hq, Wq, 3, nH, hd)`` / ``(B, Hq*Wq, 3*C)``; bias_table
    ``((2Wh-1)(2Ww-1), nH)``; ``window_size``/``shift_size`` an int or ``(h, w)`` (as timm's block
    clamps them); ``resolution`` the real ``(H, W)`` (default: the qkv grid; ``(Hq, Wq)`` must be it
    rounded up to the window); ``scale`` defaults to ``hd**-0.5``; ``attn_mask`` an extra ``(nM, N, N)``
    additive mask. Returns ``(B, H, W, C)`` (``(B, H*W, C)`` for 3-D qkv) in qkv's dtype. Differentiable
    in qkv and bias_table. See the module docstring for the kernels.

    Equivalent PyTorch::

        x = pad(roll(qkv[:, :H, :W], (-sh, -sw)))            # padded tokens: qkv's own padded rows
        q, k, v = window_partition(x)                          # (B*nW, nH, N, hd) each
        a = softmax(q @ k^T * scale + table[rel_index] + timm_shift_mask + attn_mask)
        roll(window_reverse(a @ v)[:, :H, :W], (sh, sw))       # (B, H, W, C)
    """
    geo = geometry(qkv, bias_table, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                   resolution=resolution, attn_mask=attn_mask)
    reasons = not_supported_reasons(qkv, bias_table, num_heads=num_heads, window_size=window_size,
                                    shift_size=shift_size, resolution=resolution, attn_mask=attn_mask)
    tensors = [qkv, bias_table] + ([attn_mask] if attn_mask is not None else [])
    kwargs = dict(num_heads=num_heads, window_size=window_size, shift_size=shift_size, resolution=resolution,
                  scale=scale, attn_mask=attn_mask)
    if resolve_backend(OP, backend, reasons, *tensors) == "reference":
        return swin_window_attention_reference(qkv, bias_table, **kwargs)
    scale = geo.head_dim ** -0.5 if scale is None else float(scale)
    q4 = _as_4d(qkv, geo)
    out, _ = _FWD.pick(*tensors)(q4, bias_table, attn_mask, geo.heads, geo.wh, geo.ww, geo.sh, geo.sw, geo.H, geo.W,
                                 scale)
    return out.view(geo.B, geo.H * geo.W, geo.C) if qkv.dim() == 3 else out


__all__ = [
    "swin_window_attention",
    "swin_window_attention_reference",
    "not_supported_reasons",
    "capability_reasons",
    "geometry",
    "Geometry",
    "kernel_traffic",
    "shift_mask",
    "relative_position_index",
    "table_gradient",
    "TOLERANCES",
]
