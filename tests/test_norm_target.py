"""Normalised targets (SwinV2 SimMIM ``NORM_TARGET``) and the token-index checks of the masked-only head.

- The reference ``normalize_targets_reference`` against a transcription of the official
  ``norm_targets`` (microsoft/Swin-Transformer ``models/simmim.py``) written here, and both against an
  independent float64 brute force over explicitly clipped windows (the ``count_include_pad=False``
  border semantics).
- The Triton path (integral images read at 4 corners inside the loss kernel; the interpreter on CPU)
  against the transcription evaluated in float64 (``norm_target.TOLERANCES["exact"]``) and against the
  float32 reference (``["reference"]``), loss and ``dpred`` for fp32/bf16/fp16 predictions, l1/l2/smooth_l1,
  odd image sizes (40 x 56 with patch 47, 5, 3; a patch larger than the image), all/none masked, the
  masked-only head on and off, region="all", the NaN contract.
- Bad ``norm_target`` values, and every kind of wrong ``token_index`` / ``head_tokens``.

Shapes stay tiny: the interpreter runs one Python iteration per program.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from simmim_fast import MaskGenerator, ops
from simmim_fast.models import create_model
from simmim_fast.ops import _common

nt_mod = importlib.import_module("simmim_fast.ops.norm_target")
loss_mod = importlib.import_module("simmim_fast.ops.masked_l1_loss")
head_mod = importlib.import_module("simmim_fast.ops.masked_head")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

triton_only = pytest.mark.skipif(
    not _common.HAS_TRITON or not (CUDA or _common.INTERPRET),
    reason="needs Triton and a CUDA device, or TRITON_INTERPRET=1 at import (tests/conftest.py sets it on CPU)",
)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)  # an element a kernel forgets to write shows as NaN


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(dtype).to(DEV)


def _mask(shape, seed, p=0.5):
    return (torch.rand(shape, generator=_gen(seed)) < p).to(DEV)


# ----------------------------------------------------------------------------------------------------
# transcriptions written here


def official_norm_targets(targets, patch_size):
    """microsoft/Swin-Transformer ``models/simmim.py`` ``norm_targets``, transcribed."""
    assert patch_size % 2 == 1
    targets_count = torch.ones_like(targets)
    targets_square = targets**2.0
    pad = patch_size // 2
    targets_mean = F.avg_pool2d(targets, kernel_size=patch_size, stride=1, padding=pad, count_include_pad=False)
    targets_square_mean = F.avg_pool2d(targets_square, kernel_size=patch_size, stride=1, padding=pad,
                                       count_include_pad=False)
    targets_count = F.avg_pool2d(targets_count, kernel_size=patch_size, stride=1, padding=pad,
                                 count_include_pad=True) * (patch_size**2)
    targets_var = (targets_square_mean - targets_mean**2.0) * (targets_count / (targets_count - 1))
    targets_var = torch.clamp(targets_var, min=0.0)
    return (targets - targets_mean) / (targets_var + 1.0e-6) ** 0.5


def official_loss(pred, images, mask, patch_size, per_elem=None):
    """``SimMIM.forward`` with ``NORM_TARGET.ENABLE`` (mask given at token resolution here)."""
    B, C, H, W = images.shape
    s = H // pred.shape[1]
    x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), s).float()
    m = mask.repeat_interleave(H // mask.shape[1], 1).repeat_interleave(W // mask.shape[2], 2).unsqueeze(1).float()
    x = official_norm_targets(images.float(), patch_size)
    loss_recon = F.l1_loss(x, x_rec, reduction="none") if per_elem is None else per_elem(x_rec, x)
    return (loss_recon * m).sum() / (m.sum() + 1e-5) / C


def brute_force_targets(x, patch_size):
    """float64, one pixel at a time over the window clipped to the image (unbiased variance, clamp, eps)."""
    x = x.double().cpu()
    B, C, H, W = x.shape
    r = patch_size // 2
    out = torch.empty_like(x)
    for Y in range(H):
        for X in range(W):
            win = x[:, :, max(Y - r, 0): Y + r + 1, max(X - r, 0): X + r + 1].flatten(2)
            n = win.shape[-1]
            mean = win.mean(-1)
            var = ((win - mean[..., None]) ** 2).sum(-1) / (n - 1)
            out[:, :, Y, X] = (x[:, :, Y, X] - mean) / (var.clamp(min=0) + 1e-6).sqrt()
    return out


def _per_elem(loss, beta=1.0):
    return {"l1": lambda a, b: (a - b).abs(), "l2": lambda a, b: (a - b) ** 2,
            "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, reduction="none", beta=beta)}[loss]


# ----------------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("hw,p", [((40, 56), 47), ((40, 56), 5), ((40, 56), 3), ((7, 9), 47), ((1, 6), 3)])
def test_reference_is_the_official_formula(hw, p):
    x = _randn((2, 3, *hw), 1)
    got = ops.normalize_targets_reference(x, patch_size=p)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, official_norm_targets(x, p))
    low = x.to(torch.bfloat16)  # low-precision images: the formula on their float32 values
    assert torch.equal(ops.normalize_targets_reference(low, patch_size=p), official_norm_targets(low.float(), p))


@pytest.mark.parametrize("hw,p", [((9, 11), 5), ((6, 5), 47), ((1, 4), 3)])
def test_formula_matches_clipped_windows_brute_force(hw, p):
    """The border semantics: mean over the clipped window, count = clipped area, unbiased variance."""
    x = _randn((1, 2, *hw), 2)
    exact = brute_force_targets(x, p)
    torch.testing.assert_close(official_norm_targets(x.double(), p).cpu(), exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.normalize_targets_reference(x, patch_size=p).double().cpu(), exact,
                               **nt_mod.TOLERANCES["reference"])


def test_loss_reference_is_the_official_forward():
    pred = _randn((2, 5, 7, 3 * 8 * 8), 3).requires_grad_(True)
    images, mask = _randn((2, 3, 40, 56), 4), _mask((2, 5, 7), 5)
    for p in (47, 3):
        got = ops.masked_l1_loss_reference(pred, images, mask, norm_target=p)
        exp = official_loss(pred, images, mask, p)
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
        for a, b in zip(torch.autograd.grad(got, pred), torch.autograd.grad(exp, pred)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # the masked-only head's reference and the auto backend (reference on CPU) agree with it
    feats = _randn((2, 5, 7, 6), 6)
    weight = _randn((192, 6), 7) * 0.3
    got = ops.masked_head_loss(feats, weight, None, images, mask, norm_target=47)
    torch.testing.assert_close(got, official_loss(F.linear(feats, weight), images, mask, 47), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Triton path


@triton_only
def test_integral_images_are_exact_float64_prefix_sums():
    from simmim_fast.ops._library import _direct

    x = _randn((2, 3, 40, 56), 10).permute(0, 1, 3, 2)  # non-contiguous (B, C, 56, 40)
    s1, s2 = nt_mod.integral_images(_direct, x)
    xd = x.double()
    torch.testing.assert_close(s1, xd.cumsum(-1).cumsum(-2), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(s2, (xd * xd).cumsum(-1).cumsum(-2), rtol=1e-12, atol=1e-9)


@triton_only
@pytest.mark.parametrize("hw,p,dtype", [
    ((40, 56), 47, torch.float32), ((40, 56), 5, torch.float32), ((40, 56), 3, torch.float32),
    ((7, 9), 47, torch.bfloat16), ((1, 6), 3, torch.float16),
])
def test_targets_triton_vs_exact_and_reference(hw, p, dtype):
    x = _randn((2, 3, *hw), 11, dtype)
    got = ops.normalize_targets(x, patch_size=p, backend="triton")
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), official_norm_targets(x.double(), p), **nt_mod.TOLERANCES["exact"])
    torch.testing.assert_close(got, ops.normalize_targets_reference(x, patch_size=p), **nt_mod.TOLERANCES["reference"])


@triton_only
def test_targets_triton_on_a_photograph_beats_the_float32_reference():
    """Low-variance windows of a real photo: the float32 reference's cancellation shows, the Triton path
    (float64 integral images) stays within ``TOLERANCES["exact"]`` of the formula in float64."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(48, 48), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((img - mean) / std).to(DEV)
    exact = official_norm_targets(x.double(), 47)
    got = ops.normalize_targets(x, patch_size=47, backend="triton")
    torch.testing.assert_close(got.double(), exact, **nt_mod.TOLERANCES["exact"])


def _tie_free(pred, target, tol):
    """Token-layout bool: elements whose prediction is farther than the targets' tolerance from the
    reference target (where an l1 gradient's sign is determined by both backends' targets)."""
    s = target.shape[2] // pred.shape[1]
    x_rec = F.pixel_shuffle(pred.detach().float().permute(0, 3, 1, 2), s)
    far = (x_rec - target).abs() > tol["atol"] + tol["rtol"] * target.abs()
    return F.pixel_unshuffle(far.float(), s).permute(0, 2, 3, 1) > 0


def _norm_loss_check(pred, images, mask, p, **kw):
    tol = loss_mod.TOLERANCES[pred.dtype]
    pr = pred.detach().requires_grad_(True)
    got = ops.masked_l1_loss(pr, images, mask, norm_target=p, backend="triton", **kw)
    exp = ops.masked_l1_loss_reference(pr, images, mask, norm_target=p, **kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, exp, **tol["loss"])
    (g1,) = torch.autograd.grad(got, pr)
    (g2,) = torch.autograd.grad(exp, pr)
    assert g1.dtype == pred.dtype and g1.shape == pred.shape
    keep = _tie_free(pred, ops.normalize_targets_reference(images, patch_size=p), nt_mod.TOLERANCES["reference"])
    assert keep.float().mean() > 0.99  # the exemption is a handful of near-ties at most
    torch.testing.assert_close(g1[keep], g2[keep], **tol["grad"])
    return got, g1


@triton_only
@pytest.mark.parametrize("p", [47, 5, 3])
def test_loss_triton_odd_image_sizes(p):
    pred = _randn((1, 5, 7, 3 * 64), 20)  # 40 x 56 images, s = 8
    _norm_loss_check(pred, _randn((1, 3, 40, 56), 21), _mask((1, 5, 7), 22), p)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss,beta", [("l1", 1.0), ("l2", 1.0), ("smooth_l1", 0.5)])
def test_loss_triton_dtypes_and_losses(loss, beta, dtype):
    pred = _randn((2, 3, 2, 3 * 16), 23, dtype)  # 12 x 8 images, s = 4, mask finer than the tokens
    images = _randn((2, 3, 12, 8), 24, dtype)
    _norm_loss_check(pred, images, _mask((2, 6, 4), 25), 47, loss=loss, beta=beta)


@triton_only
@pytest.mark.parametrize("which", ["all", "none", "region_all"])
def test_loss_triton_all_none_masked_and_region_all(which):
    pred, images = _randn((2, 3, 2, 48), 26), _randn((2, 3, 12, 8), 27)
    mask = _mask((2, 3, 2), 28)
    if which == "all":
        mask = torch.ones_like(mask)
    elif which == "none":
        mask = torch.zeros_like(mask)
    got, grad = _norm_loss_check(pred, images, mask, 5, **({"region": "all"} if which == "region_all" else {}))
    if which == "none":
        assert got.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_head_triton_with_norm_target(dtype):
    """The masked-only head (gathered rows) and the full head give the reference's loss and gradients."""
    B, h, w, Fdim, C, s = 2, 3, 4, 8, 3, 4
    feats = _randn((B, h, w, Fdim), 30, dtype).requires_grad_(True)
    weight = (_randn((C * s * s, Fdim), 31) * 0.3).to(dtype).requires_grad_(True)
    bias = _randn((C * s * s,), 32, dtype).requires_grad_(True)
    images = _randn((B, C, h * s, w * s), 33)
    mask = _mask((B, h, w), 34)
    index = ops.masked_token_index(mask, (h, w), (h * s, w * s))
    tol = head_mod.TOLERANCES[dtype]
    exp = ops.masked_l1_loss_reference(F.linear(feats, weight, bias), images, mask, norm_target=47)
    g_exp = torch.autograd.grad(exp, (feats, weight, bias))
    for head in ("masked", "full"):
        if head == "masked":
            got = ops.masked_head_loss(feats, weight, bias, images, mask, token_index=index, norm_target=47,
                                       backend="triton")
        else:
            got = ops.masked_l1_loss(F.linear(feats, weight, bias), images, mask, norm_target=47, backend="triton")
        torch.testing.assert_close(got, exp, **tol["loss"])
        for a, b in zip(torch.autograd.grad(got, (feats, weight, bias)), g_exp):
            torch.testing.assert_close(a, b, **tol["grad"])


@triton_only
def test_nan_contract_with_norm_target():
    """Predictions (and targets) at unmasked pixels never enter, in both backends. Image values enter the
    statistics of every window holding them (official); the integral images also carry a non-finite image
    value to windows below-right of it: the Triton loss is NaN for more inputs than the reference, never
    finite where the reference is NaN (documented in norm_target.py)."""
    B, h, w, s, C = 1, 3, 3, 4, 3
    pred, images = _randn((B, h, w, C * s * s), 40), _randn((B, C, h * s, w * s), 41)
    mask = torch.zeros(B, h, w, dtype=torch.bool, device=DEV)
    mask[0, 0, 0] = True  # top-left token only
    nan_pred = pred.clone()
    nan_pred[0, 2, 2, 7] = float("nan")  # an unmasked token
    nan_far = images.clone()
    nan_far[0, 1, 11, 11] = float("nan")  # bottom-right pixel, outside every masked pixel's 3 x 3 window
    nan_near = images.clone()
    nan_near[0, 0, 4, 4] = float("nan")  # unmasked, but inside the window of masked pixel (3, 3)
    nan_before = torch.zeros(B, h, w, dtype=torch.bool, device=DEV)
    nan_before[0, 2, 2] = True  # only the bottom-right token masked: the far pixel (0, 0) is above-left
    nan_top = images.clone()
    nan_top[0, 2, 0, 0] = float("nan")
    for backend in ("reference", "triton"):
        p = nan_pred.clone().requires_grad_(True)
        loss = ops.masked_l1_loss(p, images, mask, norm_target=3, backend=backend)
        (g,) = torch.autograd.grad(loss, p)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), backend
        assert torch.isfinite(ops.masked_l1_loss(pred, nan_far, mask, norm_target=3, backend=backend)), backend
        assert torch.isnan(ops.masked_l1_loss(pred, nan_near, mask, norm_target=3, backend=backend)), backend
    assert torch.isfinite(ops.masked_l1_loss(pred, nan_top, nan_before, norm_target=3, backend="reference"))
    assert torch.isnan(ops.masked_l1_loss(pred, nan_top, nan_before, norm_target=3, backend="triton"))


# ----------------------------------------------------------------------------------------------------
# bad norm_target


@pytest.mark.parametrize("bad,exc", [(4, ValueError), (1, ValueError), (0, ValueError), (-3, ValueError),
                                     (47.0, TypeError), (True, TypeError), ("47", TypeError)])
def test_bad_norm_target_is_refused_everywhere(bad, exc):
    pred, images, mask = _randn((1, 2, 2, 48), 50), _randn((1, 3, 8, 8), 51), _mask((1, 2, 2), 52)
    feats, weight = _randn((1, 2, 2, 4), 53), _randn((48, 4), 54)
    calls = [
        lambda: ops.masked_l1_loss(pred, images, mask, norm_target=bad),
        lambda: ops.masked_l1_loss_reference(pred, images, mask, norm_target=bad),
        lambda: ops.masked_head_loss(feats, weight, None, images, mask, norm_target=bad),
        lambda: ops.masked_head_loss_reference(feats, weight, None, images, mask, norm_target=bad),
        lambda: create_model("swin_tiny_cpu", img_size=64, depths=(1, 1, 1, 1), norm_target=bad),
    ]
    for call in calls:
        with pytest.raises(exc, match="norm_target"):
            call()
    with pytest.raises(exc, match="patch_size"):
        ops.normalize_targets(images, patch_size=bad)


def test_one_pixel_images_and_patch_larger_than_the_image():
    one = _randn((1, 3, 1, 1), 55)
    with pytest.raises(ValueError, match="1 x 1"):
        ops.masked_l1_loss(_randn((1, 1, 1, 3), 56), one, torch.ones(1, 1, 1, dtype=torch.bool), norm_target=3)
    with pytest.raises(ValueError, match="1 x 1"):
        ops.normalize_targets(one, patch_size=3)
    x = _randn((1, 3, 4, 6), 57)  # patch 47 > image: every window is the whole image
    got = ops.normalize_targets_reference(x, patch_size=47)
    flat = x.double().flatten(2)
    whole = (x.double() - flat.mean(-1)[..., None, None]) / (flat.var(-1)[..., None, None] + 1e-6).sqrt()
    torch.testing.assert_close(got.double(), whole, **nt_mod.TOLERANCES["reference"])


# ----------------------------------------------------------------------------------------------------
# the model

SWIN_SMALL = dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), window_size=2,
                  drop_path_rate=0.0)


def test_model_norm_target_loss_masked_and_full_head():
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", ops_backend="reference", norm_target=47, **SWIN_SMALL)
    assert model.norm_target == 47
    gen = MaskGenerator(input_size=64, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    mask = gen.generate(2, generator=_gen(60))
    images = torch.randn(2, 3, 64, 64, generator=_gen(61))
    params = [p for p in model.parameters() if p.requires_grad]
    assert model.masked_head_tokens(images, mask) is not None
    loss = model(images, mask)  # masked-only head
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    model.masked_head = False
    full = model(images, mask)
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    pred = F.linear(model.encoder(images, mask), *model._head_params())
    exp = official_loss(pred, images, mask, 47)
    torch.testing.assert_close(full, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, exp, **head_mod.TOLERANCES[torch.float32]["loss"])
    for a, b in zip(grads, full_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **head_mod.TOLERANCES[torch.float32]["grad"])
    assert torch.equal(model.targets(images), official_norm_targets(images, 47))
    plain = create_model("swin_tiny_cpu", ops_backend="reference", **SWIN_SMALL)
    assert plain.norm_target is None and torch.equal(plain.targets(images), images)


# ----------------------------------------------------------------------------------------------------
# token_index / head_tokens checks


def _index_case():
    B, h, w, s, C, Fdim = 2, 2, 3, 4, 3, 5
    feats, weight = _randn((B, h, w, Fdim), 70), _randn((C * s * s, Fdim), 71)
    images = _randn((B, C, h * s, w * s), 72)
    mask = torch.zeros(B, h, w, dtype=torch.bool, device=DEV)
    mask[0, 0, 1] = mask[0, 1, 2] = mask[1, 0, 0] = True  # tokens 1, 5, 6
    index = ops.masked_token_index(mask, (h, w), (h * s, w * s))
    assert index.tolist() == [1, 5, 6]
    return feats, weight, images, mask, index


WRONG_INDEX = [
    # name, index, error, message
    ("negative", [1, 5, -1], ValueError, r"outside \[0, 12\)"),
    ("past_the_end", [1, 5, 6, 12], ValueError, r"outside \[0, 12\)"),
    ("duplicate", [1, 5, 6, 5], ValueError, "1 tokens listed more than once, e.g. \\[5\\]"),
    ("missing", [1, 6], ValueError, "1 tokens holding masked pixels missing, e.g. \\[5\\]"),
    ("extra", [0, 1, 5, 6], ValueError, "1 tokens without a masked pixel listed, e.g. \\[0\\]"),
    ("several_kinds", [1, 1, 0], ValueError, "more than once.*missing.*without a masked pixel"),
    ("too_many", list(range(12)) + [0], ValueError, "13 indices for 12 tokens"),
]


@pytest.mark.parametrize("name,idx,exc,msg", WRONG_INDEX, ids=[c[0] for c in WRONG_INDEX])
def test_wrong_token_index_is_refused(name, idx, exc, msg):
    feats, weight, images, mask, _ = _index_case()
    bad = torch.tensor(idx, dtype=torch.int64, device=DEV)
    backends = ["reference"] + (["triton"] if _common.HAS_TRITON and (CUDA or _common.INTERPRET) else [])
    for backend in backends:
        with pytest.raises(exc, match="^token_index: .*" + msg):
            ops.masked_head_loss(feats, weight, None, images, mask, token_index=bad, check_index=True,
                                 backend=backend)
    if DEV.type == "cpu":  # CPU indices: checked by default
        with pytest.raises(exc, match=msg):
            ops.masked_head_loss_reference(feats, weight, None, images, mask, token_index=bad)


def test_token_index_type_device_and_switches():
    feats, weight, images, mask, index = _index_case()
    for bad in (index.to(torch.int32), index[None], index.tolist()):
        with pytest.raises(TypeError, match="^token_index: expected a 1-D int64"):
            ops.masked_head_loss(feats, weight, None, images, mask, token_index=bad)
    with pytest.raises(ValueError, match="^token_index: on meta"):
        ops.masked_head_loss(feats, weight, None, images, mask, token_index=index.to("meta"))
    with pytest.raises(TypeError, match="check_index"):
        ops.masked_head_loss(feats, weight, None, images, mask, token_index=index, check_index=1)
    # the order is free: a permutation of the right set gives the same loss
    a = ops.masked_head_loss(feats, weight, None, images, mask, token_index=index)
    b = ops.masked_head_loss(feats, weight, None, images, mask, token_index=index.flip(0))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # check_index=False: values unchecked (the caller vouches), the shape-only checks still run
    missing = index[:2]
    dropped = ops.masked_head_loss(feats, weight, None, images, mask, token_index=missing, check_index=False)
    assert dropped < a  # what an unchecked wrong index does: silently drops token 6
    with pytest.raises(ValueError, match="13 indices"):
        ops.masked_head_loss(feats, weight, None, images, mask, token_index=torch.zeros(13, dtype=torch.int64,
                             device=DEV), check_index=False)


def test_token_index_values_unchecked_off_cpu_and_while_compiling(monkeypatch):
    """Default: values are checked for CPU indices only (no device sync in the training loop, whose index
    lives on the GPU) and not while torch.compile traces; ``content=True`` checks anywhere."""
    _, _, _, mask, index = _index_case()
    wrong = torch.tensor([0, 0], dtype=torch.int64)
    meta_mask, meta_wrong = mask.to("meta"), wrong.to("meta")
    grid, size = (2, 3), (8, 12)
    ops.check_token_index(meta_wrong, meta_mask, grid, size, device=torch.device("meta"))  # cheap checks only
    ops.check_token_index(wrong, mask.cpu(), grid, size, device=torch.device("cpu"), content=False)
    with pytest.raises(ValueError, match="more than once"):
        ops.check_token_index(wrong, mask.cpu(), grid, size, device=torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops.check_token_index(wrong, mask.cpu(), grid, size, device=torch.device("cpu"))


def test_model_head_tokens_checked():
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", ops_backend="reference", **SWIN_SMALL)
    images = torch.randn(2, 3, 64, 64, generator=_gen(80))
    coarse = torch.zeros(2, 2, 2, dtype=torch.bool)
    coarse[0, 0, 1] = coarse[1, 1, 0] = True
    mask = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # model-patch resolution
    idx = model.masked_head_tokens(images, mask)
    assert idx.tolist() == [1, 6]
    torch.testing.assert_close(model(images, mask, head_tokens=idx), model(images, mask), rtol=0, atol=0)
    for bad, msg in [([1, 6, 6], "more than once"), ([1], "missing"), ([1, 6, 7], "without a masked pixel"),
                     ([1, 8], "outside"), (list(range(8)) + [0], "9 indices")]:
        with pytest.raises(ValueError, match="^head_tokens: .*" + msg):
            model(images, mask, head_tokens=torch.tensor(bad))
    with pytest.raises(ValueError, match="^head_tokens: expected a 1-D int64"):
        model(images, mask, head_tokens=idx.to(torch.int32))
    with pytest.raises(ValueError, match="^head_tokens: expected a 1-D int64"):
        model(images, mask, head_tokens=[1, 6])
    model.check_head_tokens = False  # the debug switch off: values not checked
    assert torch.isfinite(model(images, mask, head_tokens=torch.tensor([1])))
    everything = create_model("swin_tiny_cpu", ops_backend="reference", predict="all", **SWIN_SMALL)
    with pytest.raises(ValueError, match="^head_tokens: the masked-only head needs predict='masked'"):
        everything(images, mask, head_tokens=idx)
    with pytest.raises(TypeError, match="check_head_tokens"):
        create_model("swin_tiny_cpu", check_head_tokens="yes", **SWIN_SMALL)
