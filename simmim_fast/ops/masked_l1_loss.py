"""SimMIM reconstruction loss on masked pixels, read from the head's token layout.

Shapes
    pred     (B, h, w, C*s*s)  head output in ``PixelShuffle`` channel order, any strides
    images   (B, C, H, W)      with H = h*s, W = w*s, any strides
    mask     (B, mh, mw)       0/1, H % mh == 0 and W % mw == 0 (nearest-upsampled to pixels)
    returns  float32 scalar

The official SimMIM loss (``models/simmim.py``)::

    (|pixel_shuffle(pred) - images| * m).sum() / (m.sum() + eps) / C

with ``m`` the pixel mask broadcast over channels but counted once per pixel in ``m.sum()``. Values at
unmasked pixels never enter the loss, a NaN there included (both backends; the official expression
would propagate it).
``loss`` selects the per-element regression loss of the paper's ablation (``"l1"``, ``"l2"``,
``"smooth_l1"`` with ``beta``); ``region="all"`` is the reconstruct-all variant (``m`` = 1).
``norm_target=p`` regresses SwinV2 SimMIM's normalised targets instead of the pixels (``NORM_TARGET``:
each pixel normalised by the mean and unbiased variance of its ``p x p`` neighbourhood, official p = 47;
``norm_target.py``); the targets are not differentiated. Predictions and targets at unmasked pixels
still never enter; image values at unmasked pixels do enter the statistics of the masked pixels whose
window holds them (the official definition; non-finite images: see ``norm_target.py``).

Triton path: one program per token reads the mask of the token's ``s x s`` pixels at the mask's own
grid (never upsampled in memory); a token without a masked pixel reads nothing else and writes
zeros. Otherwise it reads the token's prediction row and its pixels, adds its share of the loss to a
per-token partial sum (reduced by ``torch.sum``: deterministic) and writes the gradient for ``pred``
in the same pass (the shuffled prediction is never materialised). ``m.sum()`` is known before the
kernel runs (``mask.sum() * rh * rw`` on the coarse mask), so the gradient is final up to the
upstream scalar: backward is one multiplication of that buffer (as Liger's fused cross entropy).
The buffer has ``pred``'s dtype, float32 for float16 ``pred`` (the scaled values are float16
subnormals at real sizes; a GradScaler multiplies them only in backward).
The same kernel reads gathered rows (``token_index``) for the masked-only head (``masked_head.py``).
With ``norm_target`` one Triton pass per image plane first writes float64 integral images of the
pixels and their squares; the loss kernel turns a masked pixel into its target with 4 corner reads
of each (``norm_target.window_target``): the two pooled images of the official code never exist.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    cast_to,
    check_float,
    check_grid,
    check_mask_dtype,
    check_same_batch,
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
from .norm_target import check_norm_target, integral_images, norm_target_reasons, normalize_targets_reference
from .pixel_shuffle_head import head_stride

if HAS_TRITON:
    from .norm_target import window_target

OP = "masked_l1_loss"
LOSSES = ("l1", "l2", "smooth_l1")
REGIONS = ("masked", "all")
MAX_TILE = 16384  # s*s pixels of one token in one tile

#: Tolerances of the Triton path against the reference, by ``pred`` dtype. The loss is a float32 sum
#: in another order (rtol 1e-5). The gradient is ``dloss(pred - x) * m / ((m.sum() + eps) * C)``
#: computed in float32 and rounded once to ``pred``'s dtype, as the reference's; the float32 scale
#: may differ by an ulp, which can move a low-precision rounding by one ulp (2^-8 bf16, 2^-11 fp16).
#: With ``norm_target`` the same tolerances hold against the reference loss for inputs whose windows have a
#: variance of at least ~0.1 (the targets then agree to ``norm_target.TOLERANCES["reference"]``); where a
#: prediction lies within that distance of its target an l1/smooth_l1 gradient element may take the other
#: sign (tests allow exactly those elements, nothing else).
TOLERANCES = {
    torch.float32: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-5, atol=1e-7)),
    torch.bfloat16: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=8e-3, atol=1e-7)),
    torch.float16: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-3, atol=1e-7)),
}

_LOSS_CODE = {"l1": 0, "l2": 1, "smooth_l1": 2}

if HAS_TRITON:

    @triton.jit
    def _loss_kernel(
        pred_ptr, img_ptr, mask_ptr, idx_ptr, scale_ptr, part_ptr, grad_ptr, s1_ptr, s2_ptr,
        h, w, s, rh, rw, beta, r,
        p_sb, p_sy, p_sx, p_sk,
        i_sb, i_sc, i_sy, i_sx,
        m_sb, m_sy, m_sx,
        C: tl.constexpr, LOSS: tl.constexpr, ALL: tl.constexpr, GATHERED: tl.constexpr, WRITE_GRAD: tl.constexpr,
        NORM: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One token per program: its C x (s*s) values; partial loss -> part[pid], gradient -> grad row pid.

        ``C`` (image channels, 3 in practice) is a compile-time constant: the channel loop is unrolled
        (``static_range``), which also keeps runtime-bounded ``range`` loops out of the kernel (triton
        3.6's interpreter fails on those with NumPy >= 2.4).
        ``NORM``: the target of a masked pixel is its normalised value (window radius ``r``) from the
        integral images ``s1``/``s2`` ((B, C, H, W) float64, contiguous); unmasked pixels read none.
        """
        pid = tl.program_id(0)
        hw = h * w
        if GATHERED:
            tok = tl.load(idx_ptr + pid)  # row pid of pred holds token tok of the (B, h, w) grid
            b = tok // hw
            rem = tok - b * hw
            y = rem // w
            x = rem - y * w
            prow = pid * p_sb
        else:
            b = pid // hw
            rem = pid - b * hw
            y = rem // w
            x = rem - y * w
            prow = b * p_sb + y * p_sy + x * p_sx
        p = tl.arange(0, BLOCK_P)
        ss = s * s
        pm = p < ss
        i = p // s
        j = p - i * s
        Y = y * s + i
        X = x * s + j
        if ALL:
            m = tl.where(pm, 1.0, 0.0)
        else:
            m = tl.load(mask_ptr + b * m_sb + (Y // rh) * m_sy + (X // rw) * m_sx, mask=pm, other=0)
            m = m.to(tl.float32)
        keep = m != 0  # an unmasked pixel never counts, a NaN there included (the reference's contract)
        nz = tl.sum(keep.to(tl.int32), axis=0)
        grow = pid * C * ss
        if nz > 0:
            scale = tl.load(scale_ptr)
            acc = tl.zeros([BLOCK_P], dtype=tl.float32)
            pix = b * i_sb + Y * i_sy + X * i_sx
            for c in tl.static_range(C):
                pr = tl.load(pred_ptr + prow + (c * ss + p) * p_sk, mask=pm, other=0).to(tl.float32)
                xv = tl.load(img_ptr + pix + c * i_sc, mask=pm, other=0).to(tl.float32)
                if NORM:
                    xv = window_target(s1_ptr, s2_ptr, b * C + c, Y, X, h * s, w * s, r, xv, pm & keep)
                d = pr - xv
                sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                if LOSS == 0:
                    val = tl.abs(d)
                    gr = sgn
                elif LOSS == 1:
                    val = d * d
                    gr = 2.0 * d
                else:
                    ad = tl.abs(d)
                    small = ad < beta
                    val = tl.where(small, 0.5 * d * d / beta, ad - 0.5 * beta)
                    gr = tl.where(small, d / beta, sgn)
                acc += tl.where(keep, val * m, 0.0)
                if WRITE_GRAD:
                    tl.store(grad_ptr + grow + c * ss + p, cast_to(tl.where(keep, gr * m * scale, 0.0), grad_ptr.dtype.element_ty), mask=pm)
            tl.store(part_ptr + pid, tl.sum(acc, axis=0))
        else:
            tl.store(part_ptr + pid, 0.0)
            if WRITE_GRAD:
                zero = tl.zeros([BLOCK_P], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
                for c in tl.static_range(C):
                    tl.store(grad_ptr + grow + c * ss + p, zero, mask=pm)


def _geometry(pred, images):
    B, C, H, W = images.shape
    return B, C, H, W, math.isqrt(pred.shape[-1] // C)


def _denominator(mask, B, H, W, eps, region_all):
    """``m.sum() + eps`` of the full-resolution mask, from the coarse one (float32, like the reference)."""
    if region_all:
        msum = torch.full((), float(B * H * W), dtype=torch.float64, device=mask.device)
    else:
        rh, rw = H // mask.shape[1], W // mask.shape[2]
        msum = mask.to(torch.float64).sum() * (rh * rw)
    return msum.to(torch.float32) + eps


def _forward_impl(launch, pred, images, mask, token_index, eps, loss, region_all, beta, compute_grad, norm_target):
    B, C, H, W, s = _geometry(pred, images)
    gathered = token_index is not None
    n_rows = token_index.shape[0] if gathered else B * (H // s) * (W // s)
    denom = _denominator(mask, B, H, W, eps, region_all)
    scale = (1.0 / (denom * C)).reshape(1)
    part = new_output((n_rows,), dtype=torch.float32, device=pred.device)
    grad_shape = pred.shape if compute_grad else (0,)
    grad = new_output(grad_shape, dtype=grad_buffer_dtype(pred.dtype), device=pred.device)
    if n_rows > 0:
        m = kernel_mask(mask)
        if gathered:
            p_strides = (pred.stride(0), 0, 0, pred.stride(1))
            idx = token_index
        else:
            p_strides = pred.stride()
            idx = part  # unused (GATHERED=False)
        if norm_target:
            s1, s2 = integral_images(launch, images)  # once per batch; read at 4 corners per masked pixel
        else:
            s1 = s2 = part  # unused (NORM=False)
        block_p = next_pow2(s * s)
        launch(_loss_kernel)[(n_rows,)](
            pred, images, m, idx, scale, part, grad if compute_grad else part, s1, s2,
            H // s, W // s, s, H // m.shape[1], W // m.shape[2], float(beta), int(norm_target) // 2,
            *p_strides, *images.stride(), *m.stride(),
            C=C, LOSS=_LOSS_CODE[loss], ALL=bool(region_all), GATHERED=gathered, WRITE_GRAD=bool(compute_grad),
            NORM=bool(norm_target), BLOCK_P=block_p, num_warps=8 if block_p >= 1024 else 4,
        )
    value = part.sum() / denom / C
    return value, grad


def grad_buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The forward-filled gradient is already divided by ``(m.sum() + eps) * C`` (~1e-7 at batch 128):
    below float16's normal range, so float16 predictions get a float32 buffer (bf16 has fp32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _forward_fake(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    token_index: Optional[torch.Tensor],
    eps: float,
    loss: str,
    region_all: bool,
    beta: float,
    compute_grad: bool,
    norm_target: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_shape = pred.shape if compute_grad else (0,)
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(grad_shape, dtype=grad_buffer_dtype(pred.dtype))


def _autograd(traceable: bool):
    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        ctx.n_inputs = len(inputs)
        ctx.pred_dtype = inputs[0].dtype

    def backward(ctx, g_loss, g_grad):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0 and ctx.needs_input_grad[0]:
            raise RuntimeError(
                "masked_l1_loss: the forward ran without gradient (compute_grad=False) but backward was called"
            )
        return ((grad * g_loss).to(ctx.pred_dtype),) + (None,) * (ctx.n_inputs - 1)

    return setup_context, backward


_FWD = register("masked_l1_loss", _forward_impl, _forward_fake, autograd=_autograd)


def fused_loss(pred, images, mask, token_index, *, eps, loss, region, beta, norm_target=None):
    """Run the Triton loss (inputs already checked and capable). ``token_index``: gathered rows or None;
    ``norm_target``: None or the patch size of the normalised targets."""
    compute_grad = torch.is_grad_enabled() and pred.requires_grad
    value, _ = _FWD.pick(pred, images, mask)(
        pred, images, mask, token_index, float(eps), loss, region == "all", float(beta), compute_grad,
        int(norm_target or 0),
    )
    return value


# ----------------------------------------------------------------------------------------------------
# checks, reference, public op


def check_options(eps, loss, region, beta) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if region not in REGIONS:
        raise ValueError(f"region: expected one of {REGIONS}, got {region!r}")
    if not isinstance(eps, (int, float)) or not (eps >= 0):
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if loss == "smooth_l1" and (not isinstance(beta, (int, float)) or not (beta > 0)):
        raise ValueError(f"beta: expected a positive float for smooth_l1, got {beta!r}")


def check_images_and_mask(images, mask, *, grid: bool = True) -> tuple[int, int, int, int]:
    """images ``(B, C, H, W)`` float, mask ``(B, mh, mw)`` (its grid dividing ``(H, W)`` if ``grid``)."""
    check_float("images", images)
    check_mask_dtype("mask", mask)
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if mask.dim() != 3 or mask.shape[0] != B:
        raise ValueError(f"mask: expected (B, mh, mw) with B={B}, got shape {tuple(mask.shape)}")
    if grid:
        check_grid("mask", tuple(mask.shape[1:]), (H, W), "image size (H, W)")
    return B, C, H, W


def targets(images: torch.Tensor, norm_target: int | None) -> torch.Tensor:
    """What the reference losses compare with: ``images.float()``, or its normalised targets (not differentiated)."""
    if norm_target is None:
        return images.float()
    return normalize_targets_reference(images.detach(), patch_size=norm_target)


def _check_inputs(pred, images, mask, eps, loss, region, beta, norm_target=None) -> int:
    check_float("pred", pred)
    check_same_batch(pred=pred, images=images, mask=mask)
    B, C, H, W = check_images_and_mask(images, mask, grid=False)
    s = head_stride(pred, C)
    if pred.shape[0] != B or (pred.shape[1] * s, pred.shape[2] * s) != (H, W):
        raise ValueError(
            f"pred: shape {tuple(pred.shape)} (stride {s}) does not produce images of shape "
            f"{tuple(images.shape)}: expected ({B}, {H // s}, {W // s}, {C * s * s})"
        )
    check_grid("mask", tuple(mask.shape[1:]), (H, W), "image size (H, W)")
    check_options(eps, loss, region, beta)
    check_norm_target(norm_target, (H, W))
    return s


def not_supported_reasons(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, *, norm_target: int | None = None
) -> list[str]:
    """Every reason why the Triton kernel cannot take these inputs (empty: it can)."""
    reasons = device_reasons(pred, images, mask)
    reasons += size_reasons(pred=pred, images=images, mask=mask)
    if norm_target is not None:
        reasons += norm_target_reasons(images)
    if images.dim() == 4 and images.shape[1] > 0 and pred.shape[-1] // images.shape[1] > MAX_TILE:
        reasons.append(f"a token's s*s = {pred.shape[-1] // images.shape[1]} pixels exceed one tile ({MAX_TILE})")
    return reasons


def per_element_loss(x_rec: torch.Tensor, x: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    if loss == "l1":
        return (x_rec - x).abs()
    if loss == "l2":
        return (x_rec - x).square()
    return F.smooth_l1_loss(x_rec, x, reduction="none", beta=beta)


def masked_l1_loss_reference(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-5,
    loss: str = "l1",
    region: str = "masked",
    beta: float = 1.0,
    norm_target: int | None = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`masked_l1_loss` (same signature, ``backend`` ignored).

    Materialises the shuffled prediction, the full-resolution mask and (``norm_target``) the official
    normalised targets of the whole image, as the official code does.
    """
    s = _check_inputs(pred, images, mask, eps, loss, region, beta, norm_target)
    C, H, W = images.shape[1:]
    x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), s).float()
    x = targets(images, norm_target)
    if region == "all":
        per_elem = per_element_loss(x_rec, x, loss, beta)
        return per_elem.sum() / (per_elem[:, :1].numel() + eps) / C
    m = upsample_mask(mask, (H, W)).to(torch.float32).unsqueeze(1)
    # unmasked pixels never enter the loss or its gradient, whatever their value (a NaN there stays out, as
    # in the fused kernel, which does not read them); for finite inputs this is the official expression
    keep = m != 0
    x_rec, x = torch.where(keep, x_rec, 0.0), torch.where(keep, x, 0.0)
    per_elem = per_element_loss(x_rec, x, loss, beta)
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
    norm_target: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SimMIM loss over masked pixels, from the head output in token layout ``(B, h, w, C*s*s)``.

    Returns a float32 scalar, differentiable in ``pred``. ``norm_target``: None (regress the pixels) or an
    odd patch size >= 3 (official 47): regress SwinV2 SimMIM's normalised targets (``norm_target.py``).

    Equivalent PyTorch::

        m = mask.repeat_interleave(H // mh, 1).repeat_interleave(W // mw, 2).unsqueeze(1).float()
        x_rec = F.pixel_shuffle(pred.permute(0, 3, 1, 2), s).float()
        x = norm_targets(images, norm_target) if norm_target else images  # official models/simmim.py
        ((x_rec - x).abs() * m).sum() / (m.sum() + eps) / C
    """
    _check_inputs(pred, images, mask, eps, loss, region, beta, norm_target)
    reasons = not_supported_reasons(pred, images, mask, norm_target=norm_target)
    if resolve_backend(OP, backend, reasons, pred, images, mask) == "reference":
        return masked_l1_loss_reference(
            pred, images, mask, eps=eps, loss=loss, region=region, beta=beta, norm_target=norm_target
        )
    return fused_loss(pred, images, mask, None, eps=eps, loss=loss, region=region, beta=beta, norm_target=norm_target)
