"""Normalised regression targets of SwinV2 SimMIM (``NORM_TARGET``), and their integral-image fast path.

Shapes
    images   (B, C, H, W)   any float dtype, any strides
    returns  (B, C, H, W)   float32 targets

The official code (microsoft/Swin-Transformer ``models/simmim.py``, ``norm_targets``; enabled by
``MODEL.SIMMIM.NORM_TARGET.ENABLE``, ``PATCH_SIZE`` 47 in ``config.py`` and in
``simmim_pretrain__swinv2_base__img192_window12__800ep.yaml``) replaces each pixel by its value
normalised with the mean and variance of its ``p x p`` neighbourhood (``p`` odd, ``r = p // 2``)::

    mean    = avg_pool2d(x,    p, stride=1, padding=r, count_include_pad=False)
    mean_sq = avg_pool2d(x**2, p, stride=1, padding=r, count_include_pad=False)
    count   = avg_pool2d(ones, p, stride=1, padding=r, count_include_pad=True) * p**2
    var     = clamp((mean_sq - mean**2) * (count / (count - 1)), min=0)
    target  = (x - mean) / (var + 1e-6) ** 0.5

The neighbourhood is clipped at the image borders: ``mean``/``mean_sq`` divide by the clipped area
(``count_include_pad=False``) and ``count`` is that same clipped area (the pooled ones, which are
zero outside the image, times ``p**2``), so the variance is the unbiased one of the pixels inside
the image. A patch larger than the image is allowed (every window is then clipped); a 1 x 1 image
is refused (a one-pixel window has no unbiased variance: the official ``count / (count - 1)`` is 1/0).

Fast path: the two pooled images are never materialised. One Triton pass per image plane writes
the inclusive integral images ``S1 = cumsum_y cumsum_x x`` and ``S2 = ... x**2`` in float64
(``integral_images``); a target is then 4 corner reads of each over the clipped window
(:func:`window_target`, a ``@triton.jit`` helper that ``masked_l1_loss``'s kernel calls for masked
pixels only). Why float64: at 192 x 192 the sums of squares reach ~1e5, where a float32 ulp
(~0.01) is of the order of a low-variance window's whole ``sum - mean**2 * n``; measured on the
embedded photographs (ImageNet-normalised, p = 47), float32 integral images are off by up to 9e-4
(4e-4 mean-shifted) against the formula in float64, float64 ones by 4e-7. The official float32
``avg_pool2d`` is itself off by up to 4.4e-3 there (cancellation in ``mean_sq - mean**2``): the
Triton path is the more exact of the two, so its tolerance is stated against the formula evaluated
in float64 (``TOLERANCES``).

Non-finite images: the official statistics read every image pixel of a masked pixel's window, so
a NaN/inf image value enters the targets of the windows holding it (reference). In the integral
images it also reaches every window whose corners lie below-right of it, so the fused loss is NaN
for more inputs than the reference (never finite where the reference is NaN). Predictions and
targets at unmasked pixels still never enter the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    INT32_LIMIT,
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

OP = "normalize_targets"
DEFAULT_PATCH = 47  # MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE of the official config
EPS = 1e-6  # the official ``(var + 1e-6) ** 0.5``
MAX_W = 4096  # image width one integral-image program holds in registers (a row tile)
TILE = 2048  # elements of one row tile of the integral-image kernel (BLOCK_R * BLOCK_W)

#: Tolerances of the Triton targets. ``exact``: against the official formula evaluated in float64
#: (float64 integral images, final division in float64, one rounding to float32: a few float32 ulps).
#: ``reference``: against the float32 reference, whose own error comes from cancellation in
#: ``mean_sq - mean**2`` and grows as a window's variance shrinks: stated for inputs whose windows have a
#: variance of at least ~0.1 (random test images); on photographs use ``exact`` (the reference is off by up
#: to 4.4e-3 against float64 there, see the module doc).
TOLERANCES = {
    "exact": dict(rtol=1e-6, atol=1e-6),
    "reference": dict(rtol=1e-4, atol=1e-4),
}


def check_norm_target(
    norm_target, image_size: tuple[int, int] | None = None, *, name: str = "norm_target"
) -> int | None:
    """``None`` (off) or the official patch size: an odd int >= 3; with ``image_size`` not a 1 x 1 image."""
    if norm_target is None:
        return None
    if isinstance(norm_target, bool) or not isinstance(norm_target, int):
        raise TypeError(
            f"{name}: expected None or an odd int patch size (official {DEFAULT_PATCH}), got {norm_target!r}"
        )
    if norm_target < 3 or norm_target % 2 == 0:
        raise ValueError(
            f"{name}: expected an odd patch size >= 3 (official {DEFAULT_PATCH}; 1 has no unbiased variance), "
            f"got {norm_target}"
        )
    if image_size is not None and tuple(image_size) == (1, 1):
        raise ValueError(f"{name}: 1 x 1 images have one-pixel windows (no unbiased variance)")
    return norm_target


def _check_images(images, patch_size) -> None:
    check_float("images", images)
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    if patch_size is None:
        raise TypeError(f"patch_size: expected an odd int (official {DEFAULT_PATCH}), got None")
    check_norm_target(patch_size, tuple(images.shape[2:]), name="patch_size")


# ----------------------------------------------------------------------------------------------------
# kernels

if HAS_TRITON:

    @triton.jit
    def _integral_kernel(
        img_ptr, s1_ptr, s2_ptr,
        C, H, W,
        i_sb, i_sc, i_sy, i_sx,
        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        """One image plane per program: inclusive float64 integral images of x and x**2, (H, W) each.

        Tiles of BLOCK_R rows: 2-D prefix sum inside the tile (``tl.cumsum`` along columns, then rows)
        plus the column sums of every row above it (``carry``). A ``while`` loop over the tiles (triton
        3.6's interpreter fails on runtime-bounded ``range`` with NumPy >= 2.4).
        """
        plane = tl.program_id(0)
        b = plane // C
        c = plane - b * C
        rows = tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_W)
        src = img_ptr + b * i_sb + c * i_sc
        dst = plane * H * W
        carry1 = tl.zeros([BLOCK_W], dtype=tl.float64)
        carry2 = tl.zeros([BLOCK_W], dtype=tl.float64)
        y = 0
        while y < H:
            yy = y + rows
            ok = (yy < H)[:, None] & (cols < W)[None, :]
            v = tl.load(src + yy[:, None] * i_sy + cols[None, :] * i_sx, mask=ok, other=0)
            v = v.to(tl.float32).to(tl.float64)
            r1 = tl.cumsum(v, axis=1)  # row prefix sums
            r2 = tl.cumsum(v * v, axis=1)  # x**2 of a float32 value is exact in float64
            off = dst + yy[:, None] * W + cols[None, :]
            tl.store(s1_ptr + off, tl.cumsum(r1, axis=0) + carry1[None, :], mask=ok)
            tl.store(s2_ptr + off, tl.cumsum(r2, axis=0) + carry2[None, :], mask=ok)
            carry1 += tl.sum(r1, axis=0)
            carry2 += tl.sum(r2, axis=0)
            y += BLOCK_R

    @triton.jit
    def window_target(s1_ptr, s2_ptr, plane, Y, X, H, W, r, xv, valid):
        """Normalised target (float32) of pixels ``(Y, X)`` (int32 blocks) of image plane ``plane`` with values
        ``xv`` (float32), from the inclusive integral images; only ``valid`` pixels read memory.

        The window ``[Y - r, Y + r] x [X - r, X + r]`` clipped to the image; its sums are
        ``S[y1, x1] - S[y0 - 1, x1] - S[y1, x0 - 1] + S[y0 - 1, x0 - 1]`` (a corner outside the image is 0),
        its count the clipped area, as ``count_include_pad=False``.
        """
        ya = tl.maximum(Y - r, 0) - 1  # the row above the window (-1: none)
        yb = tl.minimum(Y + r, H - 1)
        xa = tl.maximum(X - r, 0) - 1
        xb = tl.minimum(X + r, W - 1)
        n = tl.where(valid, (yb - ya) * (xb - xa), 2).to(tl.float64)  # >= 2 for valid pixels (no 1 x 1 image)
        base = plane * H * W
        top = valid & (ya >= 0)
        left = valid & (xa >= 0)
        corner = top & (xa >= 0)
        o11 = base + yb * W + xb
        o01 = base + ya * W + xb
        o10 = base + yb * W + xa
        o00 = base + ya * W + xa
        sum1 = (tl.load(s1_ptr + o11, mask=valid, other=0.0) - tl.load(s1_ptr + o01, mask=top, other=0.0)
                - tl.load(s1_ptr + o10, mask=left, other=0.0) + tl.load(s1_ptr + o00, mask=corner, other=0.0))
        sum2 = (tl.load(s2_ptr + o11, mask=valid, other=0.0) - tl.load(s2_ptr + o01, mask=top, other=0.0)
                - tl.load(s2_ptr + o10, mask=left, other=0.0) + tl.load(s2_ptr + o00, mask=corner, other=0.0))
        mean = sum1 / n
        var = (sum2 / n - mean * mean) * (n / (n - 1.0))
        var = tl.where(var < 0.0, 0.0, var)  # clamp(min=0), NaN kept (tl.maximum would drop it on GPUs)
        t = (xv.to(tl.float64) - mean) / tl.sqrt(var + 1e-6)
        return t.to(tl.float32)

    @triton.jit
    def _targets_kernel(
        img_ptr, s1_ptr, s2_ptr, out_ptr,
        C, H, W, r,
        i_sb, i_sc, i_sy, i_sx,
        BLOCK: tl.constexpr,
    ):
        """BLOCK pixels of image plane ``program_id(0)`` (row-major) per program -> float32 targets."""
        plane = tl.program_id(0)
        b = plane // C
        c = plane - b * C
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < H * W
        Y = idx // W
        X = idx - Y * W
        xv = tl.load(img_ptr + b * i_sb + c * i_sc + Y * i_sy + X * i_sx, mask=ok, other=0).to(tl.float32)
        t = window_target(s1_ptr, s2_ptr, plane, Y, X, H, W, r, xv, ok)
        tl.store(out_ptr + plane * H * W + idx, t, mask=ok)


def integral_images(launch, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive integral images ``(B, C, H, W)`` float64 of ``images`` and of its square (one Triton pass).

    Equivalent PyTorch: ``x = images.double(); x.cumsum(-1).cumsum(-2), (x * x).cumsum(-1).cumsum(-2)``.
    """
    B, C, H, W = images.shape
    s1 = new_output((B, C, H, W), dtype=torch.float64, device=images.device)
    s2 = new_output((B, C, H, W), dtype=torch.float64, device=images.device)
    if images.numel():
        block_w = next_pow2(W)
        block_r = max(1, min(TILE // block_w, next_pow2(H)))
        launch(_integral_kernel)[(B * C,)](
            images, s1, s2, C, H, W, *images.stride(),
            BLOCK_R=block_r, BLOCK_W=block_w, num_warps=8 if block_w >= 2048 else 4,
        )
    return s1, s2


# ----------------------------------------------------------------------------------------------------
# op


def _targets_impl(launch, images, patch_size):
    B, C, H, W = images.shape
    s1, s2 = integral_images(launch, images)
    out = new_output((B, C, H, W), dtype=torch.float32, device=images.device)
    if images.numel():
        block = min(1024, next_pow2(H * W))
        launch(_targets_kernel)[(B * C, triton.cdiv(H * W, block))](
            images, s1, s2, out, C, H, W, patch_size // 2, *images.stride(), BLOCK=block, num_warps=4,
        )
    return out


def _targets_fake(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    return images.new_empty(images.shape, dtype=torch.float32)


_FWD = register("normalize_targets", _targets_impl, _targets_fake)


def norm_target_reasons(images: torch.Tensor) -> list[str]:
    """Reasons why the integral-image kernels cannot take ``images`` (besides the device)."""
    reasons = []
    if images.dim() == 4:
        if images.shape[3] > MAX_W:
            reasons.append(f"normalised targets: image width {images.shape[3]} exceeds one row tile ({MAX_W})")
        if images.numel() > INT32_LIMIT:
            reasons.append(f"normalised targets: the integral images ({images.numel()} elements) exceed int32 indexing")
    return reasons


def not_supported_reasons(images: torch.Tensor, *, patch_size: int = DEFAULT_PATCH) -> list[str]:
    """Every reason why the Triton kernels cannot take ``images`` (empty: they can)."""
    return device_reasons(images) + size_reasons(images=images) + norm_target_reasons(images)


def normalize_targets_reference(
    images: torch.Tensor, *, patch_size: int = DEFAULT_PATCH, backend: str = "reference"
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`normalize_targets`: the official ``norm_targets`` on ``images.float()``
    (same operations; ``backend`` ignored). Returns ``(B, C, H, W)`` float32."""
    _check_images(images, patch_size)
    return official_formula(images.float(), patch_size)


def official_formula(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The official ``norm_targets(x, patch_size)`` in ``x``'s own dtype (tests evaluate it in float64)."""
    p, r = patch_size, patch_size // 2
    mean = F.avg_pool2d(x, kernel_size=p, stride=1, padding=r, count_include_pad=False)
    mean_sq = F.avg_pool2d(x**2.0, kernel_size=p, stride=1, padding=r, count_include_pad=False)
    count = F.avg_pool2d(torch.ones_like(x), kernel_size=p, stride=1, padding=r, count_include_pad=True) * (p**2)
    var = (mean_sq - mean**2.0) * (count / (count - 1))
    var = torch.clamp(var, min=0.0)
    return (x - mean) / (var + EPS) ** 0.5


def normalize_targets(images: torch.Tensor, *, patch_size: int = DEFAULT_PATCH, backend: str = "auto") -> torch.Tensor:
    """SwinV2 SimMIM's normalised targets ``(B, C, H, W)`` float32 (not differentiable: a regression target).

    What ``masked_l1_loss(..., norm_target=patch_size)`` compares the prediction with; the loss computes
    them itself for masked pixels only, so call this for pictures or checks, not before the loss.

    Equivalent PyTorch: the official ``norm_targets(images.float(), patch_size)`` (module doc).
    """
    _check_images(images, patch_size)
    images = images.detach()
    if resolve_backend(OP, backend, not_supported_reasons(images, patch_size=patch_size), images) == "reference":
        return normalize_targets_reference(images, patch_size=patch_size)
    return _FWD.pick(images)(images, patch_size)
