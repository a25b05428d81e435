"""Triton paths of ``simmim_fast.ops`` against their PyTorch references: outputs and every gradient.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``),
on a GPU the compiled kernels run. Every kernel output is allocated NaN-filled here
(``_common.POISON_OUTPUTS``), so an element a kernel forgets to write fails the comparison.
Tolerances come from the op modules' ``TOLERANCES``. Shapes are small (the interpreter runs one
Python loop iteration per program); one Swin-geometry case (s = 32) for the loss.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from simmim_fast import ops
from simmim_fast.ops import _common

# the op modules (the package re-exports functions of the same names)
fill_mod = importlib.import_module("simmim_fast.ops.mask_token_fill")
head_mod = importlib.import_module("simmim_fast.ops.masked_head")
loss_mod = importlib.import_module("simmim_fast.ops.masked_l1_loss")
shuffle_mod = importlib.import_module("simmim_fast.ops.pixel_shuffle_head")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

pytestmark = pytest.mark.skipif(
    not _common.HAS_TRITON or not (CUDA or _common.INTERPRET),
    reason="needs Triton and a CUDA device, or TRITON_INTERPRET=1 at import (tests/conftest.py sets it on CPU)",
)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(dtype).to(DEV)


def _mask(shape, seed, p=0.5, kind="bool"):
    m = torch.rand(shape, generator=_gen(seed)) < p
    return {"bool": m, "int64": m.to(torch.int64), "float": m.float()}[kind].to(DEV)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


# ----------------------------------------------------------------------------------------------------
# mask_token_fill

FILL_CASES = [
    # name, token shape, mask shape
    ("3d_49_tokens_61_channels", (2, 49, 61), (2, 49)),
    ("4d_6x6_grid_on_12x12", (2, 12, 12, 16), (2, 6, 6)),
    ("4d_7x7_grid_on_14x14", (1, 14, 14, 24), (1, 7, 7)),
    ("4d_non_square", (2, 12, 8, 61), (2, 3, 2)),
    ("4d_cells_2x4_tokens", (2, 12, 8, 16), (2, 6, 2)),  # row and column repeats differ
    ("4d_full_grid_batch1", (1, 6, 6, 8), (1, 6, 6)),
]


def _fill_check(tokens, mask, mask_token, grad_out, deterministic=True):
    tokens = tokens.detach().requires_grad_(True)
    mask_token = mask_token.detach().requires_grad_(True)
    out = ops.mask_token_fill(tokens, mask, mask_token, backend="triton", deterministic=deterministic)
    ref = ops.mask_token_fill_reference(tokens, mask, mask_token)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref)  # 0/1 masks: an exact select
    gt, gm = _grads(out, (tokens, mask_token), grad_out)
    rt, rm = _grads(ref, (tokens, mask_token), grad_out)
    assert gt.dtype == tokens.dtype and gm.dtype == mask_token.dtype
    assert torch.equal(gt, rt)
    torch.testing.assert_close(gm, rm, **fill_mod.TOLERANCES[mask_token.dtype])
    return out, gt, gm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,tshape,mshape", FILL_CASES, ids=[c[0] for c in FILL_CASES])
def test_fill_matches_reference(name, tshape, mshape, dtype):
    tokens = _randn(tshape, 1, dtype)
    mask_token = _randn(tshape[-1:], 2, dtype)
    _fill_check(tokens, _mask(mshape, 3), mask_token, _randn(tshape, 4, dtype))


@pytest.mark.parametrize("kind", ["int64", "float"])
def test_fill_mask_dtypes_and_float32_mask_token_with_bf16_tokens(kind):
    tokens = _randn((2, 12, 8, 16), 5, torch.bfloat16)
    mask_token = _randn((16,), 6)  # float32 mask token, bf16 tokens
    _fill_check(tokens, _mask((2, 3, 2), 7, kind=kind), mask_token, _randn((2, 12, 8, 16), 8, torch.bfloat16))


@pytest.mark.parametrize("layout", ["transposed_3d", "sliced_4d", "permuted_4d"])
def test_fill_non_contiguous(layout):
    if layout == "transposed_3d":
        tokens = _randn((2, 24, 36), 9).transpose(1, 2)  # (2, 36, 24)
        mask = _mask((2, 36), 10)
        grad_out = _randn((2, 24, 36), 11).transpose(1, 2)
    elif layout == "sliced_4d":
        tokens = _randn((2, 12, 8, 48), 9)[..., ::2]  # channel stride 2
        mask = _mask((2, 2, 3), 10).transpose(1, 2)  # (2, 3, 2), non-contiguous
        grad_out = _randn((1, 12, 8, 24), 11).expand(2, 12, 8, 24)  # batch stride 0
    else:
        tokens = _randn((2, 24, 12, 8), 9).permute(0, 2, 3, 1)  # (2, 12, 8, 24)
        mask = _mask((2, 12, 8), 10)
        grad_out = _randn((2, 24, 12, 8), 11).permute(0, 2, 3, 1)
    assert not tokens.is_contiguous() and not grad_out.is_contiguous()
    _fill_check(tokens, mask, _randn((24,), 12), grad_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [48, 80])  # one and two channel tiles (the second partial)
def test_fill_channels_first_tokens_take_the_transposing_kernel(dtype, C):
    """ViT's patch embedding hands an NCHW conv output viewed as (B, H, W, C) (14 x 14 tokens, 7 x 7 mask
    cells): the channels-first kernel takes it (checked in the launch log) and matches the reference."""
    from simmim_fast.ops import launch_log

    tokens = _randn((2, C, 14, 14), 21, dtype).flatten(2).transpose(1, 2).view(2, 14, 14, C)
    assert fill_mod.channels_first(tokens) and not fill_mod.channels_first(tokens.contiguous())
    with launch_log.record() as log:
        _fill_check(tokens, _mask((2, 7, 7), 22), _randn((C,), 23, dtype), _randn((2, 14, 14, C), 24, dtype))
    kernels = [rec["kernel"].split(":")[1] for rec in log]
    assert kernels[0] == "_fill_fwd_cf_kernel", kernels
    assert "_fill_fwd_kernel" not in kernels


def test_fill_expanded_grad():
    """``out.sum()`` gives a stride-0 upstream gradient."""
    tokens = _randn((2, 6, 6, 8), 13).requires_grad_(True)
    mask_token = _randn((8,), 14).requires_grad_(True)
    mask = _mask((2, 3, 3), 15)
    out = ops.mask_token_fill(tokens, mask, mask_token, backend="triton")
    gt, gm = torch.autograd.grad(out.sum(), (tokens, mask_token))
    up = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).float().unsqueeze(-1)
    assert torch.equal(gt, (1 - up).expand_as(tokens))
    torch.testing.assert_close(gm, up.sum().expand(8), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["all", "none"])
def test_fill_all_and_none_masked(which):
    tokens = _randn((2, 12, 12, 16), 16)
    mask_token = _randn((16,), 17)
    mask = (torch.ones if which == "all" else torch.zeros)(2, 6, 6, dtype=torch.bool, device=DEV)
    out, gt, gm = _fill_check(tokens, mask, mask_token, _randn((2, 12, 12, 16), 18))
    if which == "all":
        assert torch.equal(out, mask_token.expand_as(tokens)) and torch.equal(gt, torch.zeros_like(gt))
    else:
        assert torch.equal(out, tokens) and torch.equal(gm, torch.zeros_like(gm))


def test_fill_deterministic_bit_exact_and_atomic_close():
    """Several programs reduce ``dmask_token``: two-stage is bit-exact run to run; atomics agree closely."""
    shape = (2, 48, 48, 8)  # 4608 rows: 9 row tiles, 2 programs along rows
    tokens = _randn(shape, 19).requires_grad_(True)
    mask_token = _randn((8,), 20).requires_grad_(True)
    mask = _mask((2, 6, 6), 21)
    grad_out = _randn(shape, 22)
    runs = []
    for deterministic in (True, True, False):
        out = ops.mask_token_fill(tokens, mask, mask_token, backend="triton", deterministic=deterministic)
        runs.append(torch.autograd.grad(out, (tokens, mask_token), grad_out))
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])
    ref = torch.autograd.grad(ops.mask_token_fill_reference(tokens, mask, mask_token), (tokens, mask_token), grad_out)
    for gt, gm in runs:
        assert torch.equal(gt, ref[0])
        torch.testing.assert_close(gm, ref[1], **fill_mod.TOLERANCES[torch.float32])


def test_fill_deterministic_default_follows_torch_flag(monkeypatch):
    seen = []
    real = fill_mod._FWD

    def spy(tokens, mask, mask_token, deterministic):
        seen.append(deterministic)
        return real.pick(tokens)(tokens, mask, mask_token, deterministic)

    monkeypatch.setattr(fill_mod, "_FWD", type(real)(spy, None))
    tokens = _randn((1, 4, 4, 8), 23)
    mask_token = _randn((8,), 24)
    mask = _mask((1, 2, 2), 25)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (True, False):
            torch.use_deterministic_algorithms(flag)
            ops.mask_token_fill(tokens, mask, mask_token, backend="triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    ops.mask_token_fill(tokens, mask, mask_token, backend="triton", deterministic=True)
    assert seen == [True, False, True]


# ----------------------------------------------------------------------------------------------------
# pixel_shuffle_head

SHUFFLE_CASES = [
    # name, (B, h, w), s, in_chans
    ("s4_rgb", (2, 3, 2), 4, 3),
    ("s6_not_pow2", (1, 2, 3), 6, 3),
    ("s16_one_channel", (2, 2, 2), 16, 1),
    ("s32_batch1", (1, 1, 2), 32, 3),
    ("s2_61_channels", (2, 3, 3), 2, 61),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,bhw,s,C", SHUFFLE_CASES, ids=[c[0] for c in SHUFFLE_CASES])
def test_shuffle_matches_reference(name, bhw, s, C, dtype):
    B, h, w = bhw
    pred = _randn((B, h, w, C * s * s), 30, dtype).requires_grad_(True)
    out = ops.pixel_shuffle_head(pred, in_chans=C, backend="triton")
    ref = ops.pixel_shuffle_head_reference(pred, in_chans=C)
    assert out.shape == (B, C, h * s, w * s) and out.dtype == dtype
    assert torch.equal(out, ref)
    g = _randn(out.shape, 31, dtype)
    (got,) = torch.autograd.grad(out, pred, g)
    (exp,) = torch.autograd.grad(ref, pred, g)
    assert got.shape == pred.shape and torch.equal(got, exp)


def test_shuffle_non_contiguous_input_and_grad():
    pred = _randn((2, 48, 3, 4), 32).permute(0, 2, 3, 1).requires_grad_(True)  # (2, 3, 4, 48)
    assert not pred.is_contiguous()
    out = ops.pixel_shuffle_head(pred, backend="triton")
    assert torch.equal(out, F.pixel_shuffle(pred.permute(0, 3, 1, 2), 4))
    g = _randn((2, 3, 16, 12), 33).transpose(2, 3)  # (2, 3, 12, 16) non-contiguous
    (got,) = torch.autograd.grad(out, pred, g)
    (exp,) = torch.autograd.grad(F.pixel_shuffle(pred.permute(0, 3, 1, 2), 4), pred, g)
    assert torch.equal(got, exp)


# ----------------------------------------------------------------------------------------------------
# masked_l1_loss

LOSS_CASES = [
    # name, B, (h, w), s, C, mask grid
    ("swin_geometry_s32_mask6x6", 2, (6, 6), 32, 3, (6, 6)),
    ("vit_geometry_s16_32px_cells", 1, (4, 4), 16, 3, (2, 2)),
    ("mask_finer_than_tokens", 2, (3, 3), 8, 3, (6, 6)),
    ("misaligned_7x7_cells_on_6x6_tokens", 1, (6, 6), 7, 3, (7, 7)),
    ("non_square_batch1_one_channel", 1, (3, 2), 4, 1, (3, 4)),
]


def _loss_inputs(B, hw, s, C, grid, seed, dtype=torch.float32, p=0.5, kind="bool"):
    h, w = hw
    pred = _randn((B, h, w, C * s * s), seed, dtype)
    images = _randn((B, C, h * s, w * s), seed + 1, dtype)
    return pred, images, _mask((B, *grid), seed + 2, p=p, kind=kind)


def _loss_check(pred, images, mask, **kw):
    tol = loss_mod.TOLERANCES[pred.dtype]
    p = pred.detach().requires_grad_(True)
    got = ops.masked_l1_loss(p, images, mask, backend="triton", **kw)
    exp = ops.masked_l1_loss_reference(p, images, mask, **kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, exp, **tol["loss"])
    (g1,) = torch.autograd.grad(got, p)
    (g2,) = torch.autograd.grad(exp, p)
    assert g1.dtype == pred.dtype and g1.shape == pred.shape
    torch.testing.assert_close(g1, g2, **tol["grad"])
    return got, g1


@pytest.mark.parametrize("name,B,hw,s,C,grid", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_matches_reference(name, B, hw, s, C, grid):
    _loss_check(*_loss_inputs(B, hw, s, C, grid, seed=40))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss,region,beta", [
    ("l1", "masked", 1.0), ("l2", "masked", 1.0), ("smooth_l1", "masked", 0.5),
    ("l1", "all", 1.0), ("l2", "all", 1.0), ("smooth_l1", "all", 2.0),
])
def test_loss_variants_and_dtypes(loss, region, beta, dtype):
    pred, images, mask = _loss_inputs(2, (3, 2), 8, 3, (3, 2), seed=50, dtype=dtype)
    _loss_check(pred, images, mask, loss=loss, region=region, beta=beta)


@pytest.mark.parametrize("kind", ["int64", "float"])
def test_loss_mask_dtypes_images_float32_pred_bf16(kind):
    pred, images, mask = _loss_inputs(2, (3, 3), 4, 3, (6, 6), seed=55, dtype=torch.bfloat16, kind=kind)
    _loss_check(pred, images.float(), mask)


@pytest.mark.parametrize("which", ["all", "none"])
def test_loss_all_and_none_masked(which):
    pred, images, mask = _loss_inputs(2, (3, 3), 4, 3, (3, 3), seed=60)
    mask = torch.ones_like(mask) if which == "all" else torch.zeros_like(mask)
    got, grad = _loss_check(pred, images, mask)
    if which == "none":
        assert got.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_loss_non_contiguous_inputs():
    base = _randn((2, 48, 4, 4), 65)
    pred = base.permute(0, 2, 3, 1)  # (2, 4, 4, 48): a conv head's NCHW output viewed NHWC
    images = _randn((2, 16, 16, 3), 66).permute(0, 3, 1, 2)
    mask = _mask((2, 4, 4), 67).transpose(1, 2)
    assert not (pred.is_contiguous() or images.is_contiguous() or mask.is_contiguous())
    _loss_check(pred, images, mask)


def test_loss_skips_unmasked_tokens_without_reading_them():
    """Tokens without a masked pixel are never read: NaN there changes nothing."""
    pred, images, mask = _loss_inputs(2, (4, 4), 4, 3, (4, 4), seed=70)
    keep = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)  # (B, 1, 16, 16)
    poisoned_images = images.masked_fill(~keep, float("nan"))
    poisoned_pred = pred.masked_fill(~mask.unsqueeze(-1), float("nan"))
    p = poisoned_pred.clone().requires_grad_(True)
    got = ops.masked_l1_loss(p, poisoned_images, mask, backend="triton")
    (g,) = torch.autograd.grad(got, p)
    clean, clean_grad = _loss_check(pred, images, mask)
    assert torch.equal(got, clean) and torch.equal(g, clean_grad)


def test_loss_backward_scales_forward_buffer_and_no_grad_forward():
    pred, images, mask = _loss_inputs(1, (3, 3), 4, 3, (3, 3), seed=75)
    p = pred.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(ops.masked_l1_loss(p, images, mask, backend="triton"), p)
    (g25,) = torch.autograd.grad(ops.masked_l1_loss(p, images, mask, backend="triton") * 2.5, p)
    torch.testing.assert_close(g25, g1 * 2.5, rtol=1e-6, atol=0)
    with torch.no_grad():
        nograd = ops.masked_l1_loss(p, images, mask, backend="triton")
    torch.testing.assert_close(nograd, ops.masked_l1_loss_reference(pred, images, mask), rtol=1e-5, atol=1e-6)


def test_loss_fp16_gradient_with_tiny_scale_and_grad_scaler():
    """At batch 128 the gradient (1 / ((m.sum() + eps) * C) ~ 1e-7) is below float16's normal range;
    a GradScaler-like upstream 65536 must still give the reference's float16 gradient."""
    pred, images, mask = _loss_inputs(1, (3, 3), 4, 3, (3, 3), seed=78, dtype=torch.float16)
    eps = 3e6  # denominator as with ~3e6 masked pixels (Swin-B/192, batch 128)
    p = pred.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(ops.masked_l1_loss(p, images, mask, eps=eps, backend="triton") * 65536.0, p)
    (exp,) = torch.autograd.grad(ops.masked_l1_loss_reference(p, images, mask, eps=eps) * 65536.0, p)
    assert exp.abs().max() > 1e-3  # representable after scaling: the comparison is meaningful
    torch.testing.assert_close(got, exp, **loss_mod.TOLERANCES[torch.float16]["grad"])


def test_loss_bit_exact_repeat():
    pred, images, mask = _loss_inputs(2, (3, 3), 4, 3, (3, 3), seed=80)
    p = pred.clone().requires_grad_(True)
    a = ops.masked_l1_loss(p, images, mask, backend="triton")
    b = ops.masked_l1_loss(p, images, mask, backend="triton")
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, p)[0], torch.autograd.grad(b, p)[0])


# ----------------------------------------------------------------------------------------------------
# masked-only head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,s", [((2, 2), 8), ((8, 8), 8), ((4, 4), 4)], ids=["cells_2tok", "cells_finer", "cells_eq_tok"])
def test_masked_head_matches_full_head(grid, s, dtype):
    B, h, w, Fdim, C = 2, 4, 4, 12, 3
    feats = _randn((B, h, w, Fdim), 90, dtype).requires_grad_(True)
    weight = (_randn((C * s * s, Fdim), 91) * 0.2).to(dtype).requires_grad_(True)
    bias = _randn((C * s * s,), 92, dtype).requires_grad_(True)
    images = _randn((B, C, h * s, w * s), 93, dtype)
    # cell-aligned masks as MaskGenerator draws them (a token is all masked or all visible)
    coarse = _mask((B, 2, 2), 94)
    mask = coarse.repeat_interleave(grid[0] // 2, 1).repeat_interleave(grid[1] // 2, 2)
    index, reason = ops.masked_head_plan(mask, (h, w), (h * s, w * s))
    assert index is not None, reason
    got = ops.masked_head_loss(feats, weight, bias, images, mask, token_index=index, backend="triton")
    exp = ops.masked_l1_loss_reference(F.linear(feats, weight, bias), images, mask)
    tol = head_mod.TOLERANCES[dtype]
    torch.testing.assert_close(got, exp, **tol["loss"])
    g1 = torch.autograd.grad(got, (feats, weight, bias))
    g2 = torch.autograd.grad(exp, (feats, weight, bias))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol["grad"])


def test_masked_head_partial_tokens_exact():
    """Misaligned cells (partly masked tokens): the gathered path is still exact."""
    B, h, w, Fdim, C, s = 1, 6, 6, 8, 3, 7
    feats = _randn((B, h, w, Fdim), 95).requires_grad_(True)
    weight = _randn((C * s * s, Fdim), 96).requires_grad_(True)
    images = _randn((B, C, h * s, w * s), 97)
    mask = _mask((B, 7, 7), 98)
    got = ops.masked_head_loss(feats, weight, None, images, mask, backend="triton")
    exp = ops.masked_l1_loss_reference(F.linear(feats, weight), images, mask)
    torch.testing.assert_close(got, exp, **head_mod.TOLERANCES[torch.float32]["loss"])
    for a, b in zip(torch.autograd.grad(got, (feats, weight)), torch.autograd.grad(exp, (feats, weight))):
        torch.testing.assert_close(a, b, **head_mod.TOLERANCES[torch.float32]["grad"])


@pytest.mark.parametrize("dtype,head", [(torch.float32, "full"), (torch.bfloat16, "masked"), (torch.float16, "masked")])
def test_norm_target_loss_at_swin_geometry(dtype, head):
    """Normalised targets (patch 47) at Swin's s = 32 and a 192 px image width (the training launches that
    ``kernel_check --op-tests`` compiles); the other cases are in tests/test_norm_target.py."""
    B, h, w, Fdim, C, s = 1, 2, 6, 8, 3, 32
    feats = _randn((B, h, w, Fdim), 110, dtype).requires_grad_(True)
    weight = (_randn((C * s * s, Fdim), 111) * 0.2).to(dtype).requires_grad_(True)
    images = _randn((B, C, h * s, w * s), 112)
    mask = _mask((B, h, w), 113)
    if head == "masked":
        index = ops.masked_token_index(mask, (h, w), (h * s, w * s))
        got = ops.masked_head_loss(feats, weight, None, images, mask, token_index=index, norm_target=47, backend="triton")
    else:
        got = ops.masked_l1_loss(F.linear(feats, weight), images, mask, norm_target=47, backend="triton")
    exp = ops.masked_l1_loss_reference(F.linear(feats, weight), images, mask, norm_target=47)
    tol = head_mod.TOLERANCES[dtype]
    torch.testing.assert_close(got, exp, **tol["loss"])
    for a, b in zip(torch.autograd.grad(got, (feats, weight)), torch.autograd.grad(exp, (feats, weight))):
        torch.testing.assert_close(a, b, **tol["grad"])
    if head == "full":  # the targets alone (model.targets, pictures)
        nt_tol = importlib.import_module("simmim_fast.ops.norm_target").TOLERANCES["reference"]
        torch.testing.assert_close(ops.normalize_targets(images, patch_size=47, backend="triton"),
                                   ops.normalize_targets_reference(images, patch_size=47), **nt_tol)


# ----------------------------------------------------------------------------------------------------
# dispatch


def test_auto_picks_reference_on_cpu_even_in_interpreter_mode(monkeypatch):
    if CUDA:
        pytest.skip("CPU-only behaviour")
    calls = []
    for mod in (fill_mod, shuffle_mod, loss_mod):
        real = mod._FWD
        monkeypatch.setattr(mod, "_FWD", type(real)(lambda *a, **k: calls.append(a), None))
    tokens, mask = _randn((1, 4, 4, 12), 100), _mask((1, 2, 2), 101)
    ops.mask_token_fill(tokens, mask, torch.zeros(12))
    ops.pixel_shuffle_head(tokens)
    ops.masked_l1_loss(tokens, _randn((1, 3, 8, 8), 102), mask)
    assert calls == []
    assert _common.resolve_backend("x", "auto", [], tokens) == "reference"
    assert _common.resolve_backend("x", "triton", [], tokens) == "triton"


def test_loss_nan_contract_unmasked_pixels_never_count_in_either_backend():
    """One NaN contract: a NaN at an unmasked pixel (prediction or image) changes neither the loss nor the
    gradient, in the reference as in the fused kernel (which never reads unmasked tokens); a NaN at a
    masked pixel makes both NaN."""
    B, h, w, s, C = 2, 3, 2, 4, 3
    pred = _randn((B, h, w, C * s * s), 81)
    images = _randn((B, C, h * s, w * s), 82)
    mask = torch.zeros(B, h, w, dtype=torch.bool, device=DEV)
    mask[0, 0, 0] = mask[1, 2, 1] = True
    pred[0, 1, 1, 5] = float("nan")  # token (0, 1, 1) is unmasked
    images[1, 0, 0, 0] = float("nan")  # pixel of unmasked token (1, 0, 0)
    for backend in ("reference", "triton"):
        p = pred.clone().requires_grad_(True)
        loss = ops.masked_l1_loss(p, images, mask, backend=backend)
        (g,) = torch.autograd.grad(loss, p)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), backend
        assert (g[0, 1, 1] == 0).all()
    # a mask finer than the tokens: token (0, 0, 0) is partly masked; NaN at one of its unmasked pixels
    fine = torch.zeros(B, h * 2, w * 2, dtype=torch.bool, device=DEV)
    fine[0, 0, 0] = True  # top-left quarter of token (0, 0, 0)
    part = pred.clone()
    part[0, 0, 0, C * s * s - 1] = float("nan")  # channel 2, bottom-right pixel: unmasked
    for loss_name in ("l1", "l2", "smooth_l1"):
        for backend in ("reference", "triton"):
            p = part.clone().requires_grad_(True)
            loss = ops.masked_l1_loss(p, images, fine, loss=loss_name, backend=backend)
            (g,) = torch.autograd.grad(loss, p)
            assert torch.isfinite(loss) and torch.isfinite(g).all(), (loss_name, backend)
    bad = pred.clone()
    bad[0, 0, 0, 0] = float("nan")  # a masked pixel
    for backend in ("reference", "triton"):
        assert torch.isnan(ops.masked_l1_loss(bad, images, mask, backend=backend)), backend


def test_loss_batch_mismatch_names_the_odd_argument():
    pred = _randn((2, 3, 2, 48), 83)
    with pytest.raises(ValueError, match=r"^images: batch 3"):
        ops.masked_l1_loss(pred, _randn((3, 3, 12, 8), 84), torch.zeros(2, 3, 2, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match=r"^mask: batch 1"):
        ops.masked_l1_loss(pred, _randn((2, 3, 12, 8), 84), torch.zeros(1, 3, 2, dtype=torch.bool, device=DEV))


def test_registered_ops_take_schema_arguments_by_name():
    """The registrations are plain functions with the fake's signature: torch may call them by keyword."""
    pred = _randn((1, 2, 2, 48), 91)
    by_position = torch.ops.simmim_fast.pixel_shuffle_head(pred, 3)
    by_name = torch.ops.simmim_fast.pixel_shuffle_head(pred=pred, in_chans=3)
    assert torch.equal(by_position, by_name)
    assert torch.equal(by_name, F.pixel_shuffle(pred.permute(0, 3, 1, 2), 4))
