"""The public ops of ``simmim_fast.ops`` against independent transcriptions (CPU).

Each op is checked against a direct transcription of the official microsoft/SimMIM formula written
here (never the library's own ``*_reference``): outputs, gradients, odd shapes (6x6 / 7x7 mask grids,
H != W, batch 1, non-contiguous inputs, 61 channels), all-/none-masked masks, fp32/bf16/fp16.

Tolerances: 0/1 masks make ``mask_token_fill`` an exact select, so its outputs are compared exactly;
float32 reductions use rtol=1e-5 / atol=1e-6 (summation order may differ from the transcription);
low-precision gradients are compared with the precision of their dtype.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from simmim_fast import MaskGenerator, ops
from simmim_fast.models import create_model
from simmim_fast.ops import _common

_HAS_CUDA = torch.cuda.is_available()

FP32_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=1e-3, atol=1e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand_mask(shape, seed=0, p=0.5):
    return torch.rand(shape, generator=_gen(seed)) < p


# ----------------------------------------------------------------------------------------------------
# independent transcriptions


def fill_transcription(tokens, mask, mask_token):
    """Official ``x * (1 - w) + mask_token * w`` in fp32, the mask nearest-upsampled by explicit indexing."""
    t = tokens.float()
    if t.dim() == 4:
        B, H, W, C = t.shape
        mh, mw = mask.shape[1:]
        rows = torch.arange(H) // (H // mh)
        cols = torch.arange(W) // (W // mw)
        m = mask[:, rows][:, :, cols]
    else:
        m = mask
    w = m.float().unsqueeze(-1)
    return t * (1.0 - w) + mask_token.float().view(*([1] * (t.dim() - 1)), -1) * w


def official_loss(pred, images, mask, eps=1e-5, per_elem=None):
    """``(|ps(pred) - x| * m).sum() / (m.sum() + eps) / C`` as in microsoft/SimMIM ``SimMIM.forward``."""
    B, C, H, W = images.shape
    s = H // pred.shape[1]
    x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), s).float()
    x = images.float()
    rh, rw = H // mask.shape[1], W // mask.shape[2]
    m = mask.repeat_interleave(rh, 1).repeat_interleave(rw, 2).unsqueeze(1).contiguous().float()
    if per_elem is None:
        loss_recon = F.l1_loss(x, x_rec, reduction="none")
    else:
        loss_recon = per_elem(x_rec, x)
    return (loss_recon * m).sum() / (m.sum() + eps) / C


# ----------------------------------------------------------------------------------------------------
# mask_token_fill


FILL_CASES = [
    # name, token shape, mask shape
    ("3d", (2, 36, 24), (2, 36)),
    ("4d_full_grid", (2, 6, 6, 24), (2, 6, 6)),
    ("4d_coarse_6x6_on_48", (2, 48, 48, 8), (2, 6, 6)),
    ("4d_grid7_on_14", (2, 14, 14, 16), (2, 7, 7)),
    ("4d_grid7_on_49", (1, 49, 49, 4), (1, 7, 7)),
    ("4d_non_square", (2, 12, 8, 16), (2, 3, 2)),
    ("batch1", (1, 8, 8, 16), (1, 4, 4)),
    ("61_channels", (2, 7, 7, 61), (2, 7, 7)),
    ("3d_61_channels", (3, 49, 61), (3, 49)),
]


@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
@pytest.mark.parametrize("name,tshape,mshape", FILL_CASES, ids=[c[0] for c in FILL_CASES])
def test_mask_token_fill_matches_transcription(name, tshape, mshape, mask_kind):
    g = _gen(1)
    tokens = torch.randn(tshape, generator=g)
    mask_token = torch.randn(tshape[-1], generator=g)
    mask_b = _rand_mask(mshape, seed=2)
    mask = {"bool": mask_b, "int64": mask_b.to(torch.int64), "float": mask_b.float()}[mask_kind]
    out = ops.mask_token_fill(tokens, mask, mask_token)
    expected = fill_transcription(tokens, mask_b, mask_token)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    assert torch.equal(out, expected)
    # masked positions hold exactly the mask token, visible ones exactly the input
    if tokens.dim() == 4:
        B, H, W, C = tokens.shape
        up = mask_b.repeat_interleave(H // mshape[1], 1).repeat_interleave(W // mshape[2], 2)
    else:
        up = mask_b
    assert torch.equal(out[up], mask_token.expand(int(up.sum()), -1))
    assert torch.equal(out[~up], tokens[~up])


def test_mask_token_fill_grid7_explicit_cells():
    """A 7x7 grid on 14x14 tokens: cell (i, j) covers rows 2i..2i+1, cols 2j..2j+1."""
    tokens = torch.randn(1, 14, 14, 5, generator=_gen(3))
    mask_token = torch.full((5,), 7.0)
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 3, 5] = True
    out = ops.mask_token_fill(tokens, mask, mask_token)
    changed = (out != tokens).any(-1)[0]
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[6:8, 10:12] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("layout", ["transposed_3d", "sliced_4d", "permuted_4d"])
def test_mask_token_fill_non_contiguous(layout):
    g = _gen(4)
    if layout == "transposed_3d":
        tokens = torch.randn(2, 24, 36, generator=g).transpose(1, 2)  # (2, 36, 24)
        mask = _rand_mask((2, 36), seed=5)
    elif layout == "sliced_4d":
        tokens = torch.randn(2, 12, 8, 48, generator=g)[..., ::2]  # (2, 12, 8, 24), channel stride 2
        mask = _rand_mask((2, 3, 2), seed=5)
    else:
        tokens = torch.randn(2, 24, 12, 8, generator=g).permute(0, 2, 3, 1)  # (2, 12, 8, 24)
        mask = _rand_mask((2, 12, 8), seed=5)
    assert not tokens.is_contiguous()
    mask_token = torch.randn(24, generator=g)
    out = ops.mask_token_fill(tokens, mask, mask_token)
    assert torch.equal(out, fill_transcription(tokens, mask, mask_token))


@pytest.mark.parametrize("which", ["all", "none"])
def test_mask_token_fill_all_and_none_masked(which):
    tokens = torch.randn(2, 12, 12, 16, generator=_gen(6))
    mask_token = torch.randn(16, generator=_gen(7))
    mask = torch.ones(2, 6, 6) if which == "all" else torch.zeros(2, 6, 6)
    out = ops.mask_token_fill(tokens, mask, mask_token)
    if which == "all":
        assert torch.equal(out, mask_token.expand_as(tokens))
    else:
        assert torch.equal(out, tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_dtype_for_mask_token", [True, False])
def test_mask_token_fill_dtypes(dtype, token_dtype_for_mask_token):
    g = _gen(8)
    tokens = torch.randn(2, 14, 14, 61, generator=g).to(dtype)
    mask_token = torch.randn(61, generator=g)
    if token_dtype_for_mask_token:
        mask_token = mask_token.to(dtype)
    mask = _rand_mask((2, 7, 7), seed=9)
    out = ops.mask_token_fill(tokens, mask, mask_token)
    assert out.dtype == dtype and out.shape == tokens.shape
    assert torch.equal(out, fill_transcription(tokens, mask, mask_token).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["3d", "4d_coarse"])
def test_mask_token_fill_gradients(dtype, form):
    g = _gen(10)
    if form == "3d":
        tshape, mask = (2, 49, 61), _rand_mask((2, 49), seed=11)
    else:
        tshape, mask = (2, 12, 8, 61), _rand_mask((2, 3, 2), seed=11)
    tokens = torch.randn(tshape, generator=g).to(dtype).requires_grad_(True)
    mask_token = torch.randn(61, generator=g).to(dtype).requires_grad_(True)
    grad_out = torch.randn(tshape, generator=g).to(dtype)

    out = ops.mask_token_fill(tokens, mask, mask_token)
    gt, gm = torch.autograd.grad(out, (tokens, mask_token), grad_out)

    t32 = tokens.detach().float().requires_grad_(True)
    m32 = mask_token.detach().float().requires_grad_(True)
    ref = fill_transcription(t32, mask, m32)
    rt, rm = torch.autograd.grad(ref, (t32, m32), grad_out.float())

    assert gt.dtype == dtype and gm.dtype == dtype and gm.shape == (61,)
    torch.testing.assert_close(gt.float(), rt, **GRAD_TOL[dtype])
    torch.testing.assert_close(gm.float(), rm, **GRAD_TOL[dtype])
    # the token gradient is an exact select of the upstream gradient
    assert torch.equal(gt.float(), rt)


def test_mask_token_fill_grad_none_masked_is_zero_for_mask_token():
    tokens = torch.randn(2, 6, 6, 8, generator=_gen(12), requires_grad=True)
    mask_token = torch.randn(8, generator=_gen(13), requires_grad=True)
    out = ops.mask_token_fill(tokens, torch.zeros(2, 3, 3, dtype=torch.bool), mask_token)
    gt, gm = torch.autograd.grad(out.square().sum(), (tokens, mask_token))
    assert torch.equal(gm, torch.zeros(8))
    torch.testing.assert_close(gt, 2 * tokens.detach(), rtol=0, atol=0)


def test_mask_token_fill_bad_inputs():
    tokens = torch.randn(2, 12, 8, 16)
    mt = torch.zeros(16)
    with pytest.raises(ValueError, match="mask"):
        ops.mask_token_fill(tokens, torch.zeros(2, 5, 2), mt)  # 5 does not divide 12
    with pytest.raises(ValueError, match="mask"):
        ops.mask_token_fill(tokens, torch.zeros(3, 3, 2), mt)  # batch mismatch
    with pytest.raises(ValueError, match="mask_token"):
        ops.mask_token_fill(tokens, torch.zeros(2, 3, 2), torch.zeros(15))
    with pytest.raises(ValueError, match="tokens"):
        ops.mask_token_fill(torch.randn(2, 16), torch.zeros(2, 16), mt)


# ----------------------------------------------------------------------------------------------------
# pixel_shuffle_head


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("s", [4, 16, 32])
def test_pixel_shuffle_head_matches_torch(s, in_chans):
    pred = torch.randn(2, 3, 2, in_chans * s * s, generator=_gen(s + in_chans))
    kw = {} if in_chans == 3 else {"in_chans": in_chans}
    out = ops.pixel_shuffle_head(pred, **kw)
    assert out.shape == (2, in_chans, 3 * s, 2 * s) and out.dtype == pred.dtype
    assert torch.equal(out, F.pixel_shuffle(pred.permute(0, 3, 1, 2), s))


def test_pixel_shuffle_head_index_formula():
    B, h, w, C, s = 2, 3, 2, 3, 4
    pred = torch.arange(B * h * w * C * s * s, dtype=torch.float32).view(B, h, w, C * s * s)
    out = ops.pixel_shuffle_head(pred)
    assert out.shape == (B, C, h * s, w * s)
    for b in range(B):
        for c in range(C):
            for y in range(h):
                for x in range(w):
                    for i in range(s):
                        for j in range(s):
                            assert out[b, c, y * s + i, x * s + j] == pred[b, y, x, c * s * s + i * s + j]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pixel_shuffle_head_dtypes_and_non_contiguous(dtype):
    base = torch.randn(2, 48, 3, 4, generator=_gen(20)).to(dtype)
    pred = base.permute(0, 2, 3, 1)  # (2, 3, 4, 48), non-contiguous
    assert not pred.is_contiguous()
    out = ops.pixel_shuffle_head(pred)
    assert out.dtype == dtype
    assert torch.equal(out, F.pixel_shuffle(pred.permute(0, 3, 1, 2), 4))


def test_pixel_shuffle_head_gradient():
    pred = torch.randn(2, 3, 2, 48, generator=_gen(21), requires_grad=True)
    g = torch.randn(2, 3, 12, 8, generator=_gen(22))
    (got,) = torch.autograd.grad(ops.pixel_shuffle_head(pred), pred, g)
    (exp,) = torch.autograd.grad(F.pixel_shuffle(pred.permute(0, 3, 1, 2), 4), pred, g)
    assert torch.equal(got, exp)


def test_pixel_shuffle_head_bad_inputs():
    with pytest.raises(ValueError, match="pred"):
        ops.pixel_shuffle_head(torch.randn(1, 2, 2, 47))  # not 3*s*s
    with pytest.raises(ValueError, match="pred"):
        ops.pixel_shuffle_head(torch.randn(1, 2, 2, 24))  # 24/3 = 8 is not a square
    with pytest.raises(ValueError, match="pred"):
        ops.pixel_shuffle_head(torch.randn(2, 2, 48))  # not 4-D
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="in_chans"):
            ops.pixel_shuffle_head(torch.randn(1, 2, 2, 48), in_chans=bad)


# ----------------------------------------------------------------------------------------------------
# masked_l1_loss


def _loss_inputs(B=2, h=6, w=6, s=8, C=3, mh=6, mw=6, seed=30, dtype=torch.float32, p=0.5):
    g = _gen(seed)
    pred = torch.randn(B, h, w, C * s * s, generator=g).to(dtype)
    images = torch.randn(B, C, h * s, w * s, generator=g).to(dtype)
    mask = _rand_mask((B, mh, mw), seed=seed + 1, p=p)
    return pred, images, mask


LOSS_CASES = [
    # name, kwargs of _loss_inputs
    ("swin_geometry_mask_6x6", dict(h=6, w=6, s=32, mh=6, mw=6)),
    ("swin_geometry_mask_48x48", dict(h=6, w=6, s=32, mh=48, mw=48)),
    ("vit_geometry_mask_14x14", dict(h=14, w=14, s=16, mh=14, mw=14)),
    ("vit_geometry_mask_7x7", dict(h=14, w=14, s=16, mh=7, mw=7)),
    ("non_square", dict(h=3, w=2, s=4, mh=3, mw=4)),
    ("batch1", dict(B=1, h=4, w=4, s=4, mh=4, mw=4)),
    ("one_channel", dict(h=4, w=4, s=4, C=1, mh=2, mw=2)),
]


@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
@pytest.mark.parametrize("name,kw", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_masked_l1_loss_matches_official(name, kw, mask_kind):
    pred, images, mask = _loss_inputs(**kw)
    m = {"bool": mask, "int64": mask.to(torch.int64), "float": mask.float()}[mask_kind]
    got = ops.masked_l1_loss(pred, images, m)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, official_loss(pred, images, mask), **FP32_TOL)


def test_masked_l1_loss_coarse_and_fine_masks_agree():
    pred, images, coarse = _loss_inputs(B=2, h=6, w=6, s=32, mh=6, mw=6, seed=40)  # 192 px
    fine = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (2, 48, 48): model-patch grid
    a = ops.masked_l1_loss(pred, images, coarse)
    b = ops.masked_l1_loss(pred, images, fine)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(a, official_loss(pred, images, fine), **FP32_TOL)


def test_masked_l1_loss_eps():
    pred, images, mask = _loss_inputs(seed=41, h=2, w=2, s=4, mh=2, mw=2)
    got = ops.masked_l1_loss(pred, images, mask, eps=3.0)
    torch.testing.assert_close(got, official_loss(pred, images, mask, eps=3.0), **FP32_TOL)


@pytest.mark.parametrize("loss,per_elem", [
    ("l1", lambda a, b: F.l1_loss(a, b, reduction="none")),
    ("l2", lambda a, b: F.mse_loss(a, b, reduction="none")),
    ("smooth_l1", lambda a, b: F.smooth_l1_loss(a, b, reduction="none", beta=1.0)),
])
def test_masked_loss_variants(loss, per_elem):
    pred, images, mask = _loss_inputs(seed=42, s=8, mh=3, mw=3)
    got = ops.masked_l1_loss(pred, images, mask, loss=loss)
    torch.testing.assert_close(got, official_loss(pred, images, mask, per_elem=per_elem), **FP32_TOL)


def test_smooth_l1_beta():
    pred, images, mask = _loss_inputs(seed=43, s=4, mh=6, mw=6)
    got = ops.masked_l1_loss(pred, images, mask, loss="smooth_l1", beta=0.25)
    exp = official_loss(pred, images, mask, per_elem=lambda a, b: F.smooth_l1_loss(a, b, reduction="none", beta=0.25))
    torch.testing.assert_close(got, exp, **FP32_TOL)
    # beta matters: differs from beta=1 on N(0, 2) residuals
    other = ops.masked_l1_loss(pred, images, mask, loss="smooth_l1", beta=1.0)
    assert not torch.allclose(got, other)


@pytest.mark.parametrize("loss,per_elem", [
    ("l1", lambda a, b: (a - b).abs()),
    ("l2", lambda a, b: (a - b).square()),
])
def test_region_all(loss, per_elem):
    pred, images, mask = _loss_inputs(seed=44, s=8, mh=6, mw=6)
    got = ops.masked_l1_loss(pred, images, mask, loss=loss, region="all")
    ones = torch.ones_like(mask)
    # the official formula with m = 1 everywhere: independent of the mask passed
    torch.testing.assert_close(got, official_loss(pred, images, ones, per_elem=per_elem), **FP32_TOL)
    x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), 8)
    # ... which is the plain mean over all elements, up to the eps in the denominator
    torch.testing.assert_close(got, per_elem(x_rec, images).mean(), **FP32_TOL)
    got_none = ops.masked_l1_loss(pred, images, torch.zeros_like(mask), loss=loss, region="all")
    torch.testing.assert_close(got_none, got, rtol=1e-6, atol=0)


def test_all_masked_and_none_masked():
    pred, images, mask = _loss_inputs(seed=45, s=4, mh=6, mw=6)
    all_m = torch.ones_like(mask)
    got = ops.masked_l1_loss(pred, images, all_m)
    torch.testing.assert_close(got, official_loss(pred, images, all_m), **FP32_TOL)
    none = ops.masked_l1_loss(pred, images, torch.zeros_like(mask))
    assert torch.isfinite(none)
    assert none.item() == 0.0
    # gradient of the none-masked loss is exactly zero and finite
    p = pred.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(ops.masked_l1_loss(p, images, torch.zeros_like(mask)), p)
    assert torch.equal(gp, torch.zeros_like(gp))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("images_dtype", ["same", "float32"])
def test_low_precision_pred_returns_float32(dtype, images_dtype):
    pred, images, mask = _loss_inputs(seed=46, s=8, mh=6, mw=6, dtype=dtype)
    if images_dtype == "float32":
        images = images.float()
    got = ops.masked_l1_loss(pred, images, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    # transcription from the same low-precision values, accumulated in fp32
    torch.testing.assert_close(got, official_loss(pred.float(), images.float(), mask), **FP32_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["l1", "l2", "smooth_l1"])
def test_masked_loss_gradient(dtype, loss):
    per_elem = {
        "l1": lambda a, b: F.l1_loss(a, b, reduction="none"),
        "l2": lambda a, b: F.mse_loss(a, b, reduction="none"),
        "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, reduction="none"),
    }[loss]
    pred, images, mask = _loss_inputs(seed=47, h=3, w=2, s=8, mh=3, mw=2, dtype=dtype)
    p = pred.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(ops.masked_l1_loss(p, images, mask, loss=loss), p)
    p32 = pred.float().requires_grad_(True)
    (exp,) = torch.autograd.grad(official_loss(p32, images.float(), mask, per_elem=per_elem), p32)
    assert got.dtype == dtype and got.shape == pred.shape
    torch.testing.assert_close(got.float(), exp, **GRAD_TOL[dtype])
    # visible pixels get no gradient at all
    vis = ~mask.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B, 24, 16)
    vis_tok = F.pixel_unshuffle(vis.unsqueeze(1).expand(-1, 3, -1, -1).float(), 8).permute(0, 2, 3, 1) > 0
    assert torch.equal(got[vis_tok], torch.zeros_like(got[vis_tok]))


def test_masked_loss_non_contiguous_inputs():
    g = _gen(48)
    base = torch.randn(2, 48, 4, 4, generator=g, requires_grad=True)
    pred = base.permute(0, 2, 3, 1)  # (2, 4, 4, 48) as a conv head's NCHW output viewed NHWC
    images = torch.randn(2, 16, 16, 3, generator=g).permute(0, 3, 1, 2)
    assert not pred.is_contiguous() and not images.is_contiguous()
    mask = _rand_mask((2, 4, 4), seed=49).transpose(1, 2)  # non-contiguous mask too
    got = ops.masked_l1_loss(pred, images, mask)
    exp = official_loss(pred, images, mask)
    torch.testing.assert_close(got, exp, **FP32_TOL)
    (g1,) = torch.autograd.grad(got, base)
    (g2,) = torch.autograd.grad(exp, base)
    torch.testing.assert_close(g1, g2, **FP32_TOL)


def test_masked_loss_bad_inputs():
    pred, images, mask = _loss_inputs(B=2, h=6, w=6, s=4, mh=6, mw=6)  # images 24x24
    with pytest.raises(ValueError, match="mask"):
        ops.masked_l1_loss(pred, images, torch.zeros(2, 5, 6))  # 24 % 5 != 0
    with pytest.raises(ValueError, match="mask"):
        ops.masked_l1_loss(pred, images, torch.zeros(2, 6, 7))  # 24 % 7 != 0
    with pytest.raises(ValueError, match="mask"):
        ops.masked_l1_loss(pred, images, torch.zeros(3, 6, 6))  # batch mismatch
    with pytest.raises(ValueError, match="mask"):
        ops.masked_l1_loss(pred, images, torch.zeros(2, 36))  # not (B, mh, mw)
    with pytest.raises(ValueError, match="pred"):
        ops.masked_l1_loss(pred[:1], images, mask)  # batch mismatch pred vs images
    with pytest.raises(ValueError, match="pred"):
        ops.masked_l1_loss(pred, images[:, :, :20], mask)  # H != h*s
    with pytest.raises(ValueError, match="pred"):
        ops.masked_l1_loss(pred, images[:, :1], mask)  # 1 channel: 48 is not 1*s*s
    with pytest.raises(ValueError, match="pred"):
        ops.masked_l1_loss(pred, torch.randn(2, 12, 24, 24), mask)  # 12 channels: stride 2, 12 px != 24 px
    with pytest.raises(ValueError, match="images"):
        ops.masked_l1_loss(pred, images[0], mask)  # not 4-D
    with pytest.raises(ValueError, match="loss"):
        ops.masked_l1_loss(pred, images, mask, loss="l3")
    with pytest.raises(ValueError, match="region"):
        ops.masked_l1_loss(pred, images, mask, region="visible")


# ----------------------------------------------------------------------------------------------------
# backend dispatch


def _small_inputs():
    tokens = torch.randn(1, 2, 2, 12)
    mask = torch.zeros(1, 2, 2)
    return tokens, mask, torch.zeros(12), torch.zeros(1, 3, 4, 4)


_NO_INTERPRETER_SCRIPT = r"""
import os, json
os.environ["TRITON_INTERPRET"] = "0"
import torch
from simmim_fast import ops
t, m, mt, img = torch.zeros(1, 2, 2, 12), torch.zeros(1, 2, 2), torch.zeros(12), torch.zeros(1, 3, 4, 4)
calls = {
    "mask_token_fill": lambda: ops.mask_token_fill(t, m, mt, backend="triton"),
    "pixel_shuffle_head": lambda: ops.pixel_shuffle_head(t, backend="triton"),
    "masked_l1_loss": lambda: ops.masked_l1_loss(t, img, m, backend="triton"),
    "masked_head_loss": lambda: ops.masked_head_loss(t, torch.zeros(12, 12), None, img, m, backend="triton"),
}
out = {"errors": {}, "auto_ok": True, "report": ops.backend_report("cpu")}
for name, call in calls.items():
    try:
        call()
        out["errors"][name] = None
    except NotImplementedError as e:
        out["errors"][name] = str(e)
out["auto_ok"] = bool(torch.equal(ops.mask_token_fill(t, m, mt), t))
print(json.dumps(out))
"""


@pytest.mark.skipif(_HAS_CUDA, reason="CPU-only behaviour")
def test_forced_triton_on_cpu_without_interpreter_lists_reasons():
    """In a fresh process without TRITON_INTERPRET, forcing Triton on CPU tensors raises with the reasons."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["auto_ok"]
    for name, msg in out["errors"].items():
        assert msg is not None, name
        assert name in msg and "CUDA" in msg and "TRITON_INTERPRET" in msg, msg
    for name, reasons in out["report"].items():
        assert reasons and any("CUDA" in r for r in reasons), (name, reasons)


def test_forced_triton_on_meta_lists_reasons():
    tokens, mask, mt, img = _small_inputs()
    meta = tokens.to("meta")
    calls = {
        "mask_token_fill": lambda: ops.mask_token_fill(meta, mask, mt, backend="triton"),
        "pixel_shuffle_head": lambda: ops.pixel_shuffle_head(meta, backend="triton"),
        "masked_l1_loss": lambda: ops.masked_l1_loss(meta, img, mask, backend="triton"),
    }
    for name, call in calls.items():
        with pytest.raises(NotImplementedError) as ei:
            call()
        msg = str(ei.value)
        assert name in msg and "device meta is not CUDA" in msg
        if name != "pixel_shuffle_head":  # the others got CPU tensors too: two reasons
            assert "different devices" in msg


def test_forced_triton_without_triton_lists_it(monkeypatch):
    monkeypatch.setattr(_common, "TRITON_IMPORT_ERROR", "ImportError: No module named 'triton'")
    tokens = torch.zeros(1, 2, 2, 12, device="meta")
    with pytest.raises(NotImplementedError) as ei:
        ops.pixel_shuffle_head(tokens, backend="triton")
    msg = str(ei.value)
    assert "triton is not importable" in msg and "device meta is not CUDA" in msg
    assert all("triton is not importable" in r[0] for r in ops.backend_report("meta").values())


def test_auto_fallback_on_cuda_logs_one_line(monkeypatch, caplog):
    """``auto`` on CUDA tensors the kernel cannot take: reference, with one log line per op (no crash)."""
    from types import SimpleNamespace

    cuda_like = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "_fallback_logged", set())
    with caplog.at_level("WARNING", logger="simmim_fast.ops"):
        for _ in range(3):
            assert _common.resolve_backend("some_op", "auto", ["triton is not importable (x)"], cuda_like) == "reference"
    lines = [r for r in caplog.records if "some_op" in r.getMessage()]
    assert len(lines) == 1 and "triton is not importable" in lines[0].getMessage()
    assert _common.resolve_backend("some_op", "auto", [], cuda_like) == "triton"
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert _common.resolve_backend("some_op", "auto", [], cpu, cuda_like) == "reference"


@pytest.mark.parametrize("backend", ["bogus", "cuda", ""])
def test_unknown_backend_raises(backend):
    tokens, mask, mt, img = _small_inputs()
    with pytest.raises(ValueError, match="backend"):
        ops.mask_token_fill(tokens, mask, mt, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ops.pixel_shuffle_head(tokens, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ops.masked_l1_loss(tokens, img, mask, backend=backend)


def test_reference_and_auto_backends_agree_on_cpu():
    tokens, mask, mt, img = _small_inputs()
    mask = _rand_mask((1, 2, 2), seed=50)
    mt = torch.randn(12, generator=_gen(51))
    img = torch.randn(1, 3, 4, 4, generator=_gen(52))
    for backend in ("auto", "reference"):
        assert torch.equal(ops.mask_token_fill(tokens, mask, mt, backend=backend), fill_transcription(tokens, mask, mt))
        assert torch.equal(ops.pixel_shuffle_head(tokens, backend=backend), F.pixel_shuffle(tokens.permute(0, 3, 1, 2), 2))
        torch.testing.assert_close(ops.masked_l1_loss(tokens, img, mask, backend=backend),
                                   official_loss(tokens, img, mask), **FP32_TOL)


def test_backend_report_lists_reasons():
    report = ops.backend_report("meta")
    assert set(report) == {"mask_token_fill", "pixel_shuffle_head", "masked_l1_loss", "masked_head_loss",
                           "swin_window_attention", "normalize_targets"}
    for name, reasons in report.items():
        assert isinstance(reasons, list) and reasons, name
        assert all(isinstance(r, str) and r for r in reasons)
        assert any("CUDA" in r for r in reasons), (name, reasons)
    default = ops.backend_report()
    if _common.HAS_TRITON and (_HAS_CUDA or _common.INTERPRET):  # Triton runs (compiled, or interpreted)
        assert all(r == [] for r in default.values()), default
    else:
        assert all(r for r in default.values()), default


# ----------------------------------------------------------------------------------------------------
# masked-only head (reference backend: gather + F.linear + reference loss of the rows)


def _head_inputs(B=2, h=4, w=4, s=8, C=3, Fdim=12, seed=60, dtype=torch.float32):
    g = _gen(seed)
    feats = torch.randn(B, h, w, Fdim, generator=g).to(dtype).requires_grad_(True)
    weight = (0.2 * torch.randn(C * s * s, Fdim, generator=g)).to(dtype).requires_grad_(True)
    bias = torch.randn(C * s * s, generator=g).to(dtype).requires_grad_(True)
    images = torch.randn(B, C, h * s, w * s, generator=g).to(dtype)
    return feats, weight, bias, images


def _full_head_official(feats, weight, bias, images, mask, per_elem=None):
    return official_loss(F.linear(feats, weight, bias), images, mask, per_elem=per_elem)


HEAD_MASKS = [
    # name, mask grid for h = w = 4 tokens of s = 8 px (32 px images), how it is drawn
    ("cells_of_2x2_tokens", (2, 2)),
    ("cells_equal_tokens", (4, 4)),
    ("finer_grid_aligned_content", (8, 8)),  # as the official mask at model-patch resolution
    ("finer_grid_partial_tokens", (16, 16)),  # random fine cells: partly masked tokens
]


@pytest.mark.parametrize("name,grid", HEAD_MASKS, ids=[c[0] for c in HEAD_MASKS])
def test_masked_head_reference_matches_full_head(name, grid):
    from simmim_fast.ops.masked_head import TOLERANCES

    feats, weight, bias, images = _head_inputs()
    if name == "finer_grid_aligned_content":
        mask = _rand_mask((2, 4, 4), seed=61).repeat_interleave(2, 1).repeat_interleave(2, 2)
    else:
        mask = _rand_mask((2, *grid), seed=61)
    got = ops.masked_head_loss(feats, weight, bias, images, mask, backend="reference")
    exp = _full_head_official(feats, weight, bias, images, mask)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got, exp, **tol["loss"])
    for a, b in zip(torch.autograd.grad(got, (feats, weight, bias)), torch.autograd.grad(exp, (feats, weight, bias))):
        torch.testing.assert_close(a, b, **tol["grad"])
    index = ops.masked_token_index(mask, (4, 4), (32, 32))
    up = mask.repeat_interleave(32 // grid[0], 1).repeat_interleave(32 // grid[1], 2)  # pixels
    expected_tokens = up.view(2, 4, 8, 4, 8).any(4).any(2).flatten().nonzero().squeeze(1)
    assert torch.equal(index, expected_tokens)


@pytest.mark.parametrize("loss,beta", [("l2", 1.0), ("smooth_l1", 0.5)])
def test_masked_head_reference_loss_variants(loss, beta):
    from simmim_fast.ops.masked_head import TOLERANCES

    feats, weight, bias, images = _head_inputs(seed=62)
    mask = _rand_mask((2, 2, 2), seed=63)
    per = {"l2": lambda a, b: F.mse_loss(a, b, reduction="none"),
           "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, reduction="none", beta=beta)}[loss]
    got = ops.masked_head_loss(feats, weight, bias, images, mask, loss=loss, beta=beta, backend="reference")
    exp = _full_head_official(feats, weight, bias, images, mask, per_elem=per)
    torch.testing.assert_close(got, exp, **TOLERANCES[torch.float32]["loss"])


def test_masked_head_reference_bf16_and_none_masked():
    from simmim_fast.ops.masked_head import TOLERANCES

    feats, weight, bias, images = _head_inputs(seed=64, dtype=torch.bfloat16)
    mask = _rand_mask((2, 2, 2), seed=65)
    got = ops.masked_head_loss(feats, weight, bias, images, mask, backend="reference")
    exp = _full_head_official(feats, weight, bias, images, mask)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(got, exp, **tol["loss"])
    for a, b in zip(torch.autograd.grad(got, (feats, weight, bias)), torch.autograd.grad(exp, (feats, weight, bias))):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, **tol["grad"])
    none = torch.zeros_like(mask)
    zero = ops.masked_head_loss(feats, weight, bias, images, none, backend="reference")
    assert zero.item() == 0.0
    gf, gw = torch.autograd.grad(zero, (feats, weight))
    assert torch.equal(gf, torch.zeros_like(gf)) and torch.equal(gw, torch.zeros_like(gw))


def test_masked_head_plan_decisions():
    coarse = _rand_mask((2, 2, 2), seed=66)  # 16 px cells over 8 px tokens: statically aligned
    index, reason = ops.masked_head_plan(coarse, (4, 4), (32, 32))
    assert index is not None and reason == ""
    assert index.numel() == int(coarse.sum()) * 4
    fine_aligned = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (2, 16, 16): 2 px cells, aligned content
    index2, _ = ops.masked_head_plan(fine_aligned, (4, 4), (32, 32))
    assert torch.equal(index, index2)
    fine_random = _rand_mask((2, 16, 16), seed=67)
    none, reason = ops.masked_head_plan(fine_random, (4, 4), (32, 32))
    assert none is None and "partly masked" in reason
    none, reason = ops.masked_head_plan(_rand_mask((2, 3, 3), seed=68), (4, 4), (48, 48))
    assert none is None and "does not align" in reason
    none, reason = ops.masked_head_plan(torch.ones(2, 2, 2, dtype=torch.bool), (4, 4), (32, 32))
    assert none is None and "every token" in reason
    none, reason = ops.masked_head_plan(coarse, (4, 4), (32, 32), region="all")
    assert none is None and "region" in reason


def test_masked_head_bad_inputs():
    feats, weight, bias, images = _head_inputs()
    mask = _rand_mask((2, 2, 2), seed=69)
    with pytest.raises(ValueError, match="weight"):
        ops.masked_head_loss(feats, weight[:-1], bias, images, mask)
    with pytest.raises(ValueError, match="bias"):
        ops.masked_head_loss(feats, weight, bias[:-1], images, mask)
    with pytest.raises(ValueError, match="features"):
        ops.masked_head_loss(feats[:, :3], weight, bias, images, mask)
    with pytest.raises(TypeError, match="token_index"):
        ops.masked_head_loss(feats, weight, bias, images, mask, token_index=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="mask"):
        ops.masked_head_loss(feats, weight, bias, images, torch.zeros(2, 3, 3))


SWIN_SMALL = dict(img_size=64, depths=(2, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), window_size=2)
VIT_SMALL = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_model_uses_masked_head_with_same_loss_and_grads(arch, monkeypatch):
    """Official masks (32 px cells, at model-patch resolution): the model gathers; same loss and gradients."""
    from simmim_fast.ops.masked_head import TOLERANCES
    from simmim_fast.models import simmim as simmim_mod

    torch.manual_seed(0)
    preset, kw, patch = ("swin_tiny_cpu", SWIN_SMALL, 4) if arch == "swin" else ("vit_tiny_cpu", VIT_SMALL, 16)
    model = create_model(preset, ops_backend="reference", **kw)
    gen = MaskGenerator(input_size=64, mask_patch_size=32, model_patch_size=patch, mask_ratio=0.6)
    mask = gen.generate(3, generator=torch.Generator().manual_seed(1))
    images = torch.randn(3, 3, 64, 64, generator=_gen(70))
    calls = []
    real = simmim_mod.masked_head_loss
    monkeypatch.setattr(simmim_mod, "masked_head_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = [p for p in model.parameters() if p.requires_grad]
    assert model.masked_head_tokens(images, mask) is not None
    loss = model(images, mask)
    assert calls == [1]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    model.masked_head = False
    assert model.masked_head_tokens(images, mask) is None
    full = model(images, mask)
    assert calls == [1]
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(loss, full, **tol["loss"])
    for a, b in zip(grads, full_grads):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, **tol["grad"])


def test_model_falls_back_to_full_head():
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", ops_backend="reference", **SWIN_SMALL)
    images = torch.randn(2, 3, 64, 64, generator=_gen(71))
    fine = _rand_mask((2, 16, 16), seed=72)  # 4 px cells: tokens (32 px) partly masked
    assert model.masked_head_tokens(images, fine) is None
    coarse = _rand_mask((2, 2, 2), seed=73)
    assert model.masked_head_tokens(images, coarse) is not None
    model_all = create_model("swin_tiny_cpu", ops_backend="reference", predict="all", **SWIN_SMALL)
    assert model_all.masked_head_tokens(images, coarse) is None
