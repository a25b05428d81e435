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
uses it automatically then. ``norm_target`` (SwinV2's normalised targets) works as in ``masked_l1_loss``.

``token_index`` must be exactly the set :func:`masked_token_index` gives (any order, each token once):
a missing token would drop its pixels from the loss, a duplicate count them twice, an unmasked one add
nothing but work. :func:`check_token_index` checks it: type, dtype, shape, device and the count bound
``N <= B*h*w`` always (no device sync); the range and the set itself (one ``bincount`` against the mask)
when the index is on the CPU and not under ``torch.compile``, or on any device with
``check_index=True`` (a debug switch: on CUDA it synchronises with the device). The trainer moves an
index computed from the CPU mask to the GPU, so its hot path pays only the cheap checks.

Static count (``torch.compile`` of the whole model, CUDA graphs): when every image masks the same number
of cells that cover whole tokens (the official generator), :func:`static_head_count` gives the number of
gathered tokens on the host and :func:`static_token_index` builds the index on the device with that static
shape and no sync (a sort of unique keys), plus a flag for a mask with more masked tokens than the count.
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
    targets,
)
from .norm_target import check_norm_target, norm_target_reasons

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


def static_head_count(
    *,
    batch_size: int,
    grid: tuple[int, int],
    mask_grid: tuple[int, int],
    masked_cells: int,
    region: str = "masked",
) -> tuple[int | None, str]:
    """``(count, "")``: the number of tokens the masked-only head gathers per step, known on the host.

    When every image masks exactly ``masked_cells`` cells of a ``mask_grid`` (the official generator:
    ``mask_count = ceil(cells * ratio)`` of ``(input_size // mask_patch_size)**2``) and each cell covers
    whole tokens of the head's ``grid`` (the cell a multiple of the encoder stride), the count is
    ``batch_size * masked_cells * (h // mh) * (w // mw)`` for every batch, so the gather can have a static
    shape (``torch.compile``, CUDA graphs; :func:`static_token_index`). ``(None, reason)`` otherwise.
    """
    for name, v in (("batch_size", batch_size), ("masked_cells", masked_cells)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if region != "masked":
        return None, f"region={region!r}: every token is predicted"
    (h, w), (mh, mw) = grid, mask_grid
    if h % mh or w % mw:
        return None, (f"mask cells (a {mh}x{mw} grid) do not cover whole head tokens (a {h}x{w} grid): how many "
                      f"tokens hold masked pixels depends on the mask")
    if masked_cells > mh * mw:
        raise ValueError(f"masked_cells: {masked_cells} is more than the {mh * mw} cells of a {mh}x{mw} grid")
    count = batch_size * masked_cells * (h // mh) * (w // mw)
    if count >= batch_size * h * w:
        return None, "every token holds masked pixels"
    return count, ""


def static_token_index(
    mask: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int], count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index (count,) int64, overflow () bool)`` without a device sync and with a static shape.

    ``index`` lists the tokens holding masked pixels first, in ascending order (what
    :func:`masked_token_index` gives when there are exactly ``count`` of them), then, if there are fewer,
    tokens without masked pixels (which add nothing to the loss or its gradients: still exact).
    ``overflow`` is True when more than ``count`` tokens hold masked pixels: then some were left out
    and the caller must not use the result (the SimMIM model turns its loss into NaN, which the
    trainer's finite check reports). Equivalent PyTorch (when exactly ``count`` tokens hold masked
    pixels): ``masked_token_index(mask, grid, image_size)``.
    """
    t = token_mask(mask, grid, image_size).flatten()  # (B*h*w,) bool
    total = t.numel()
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= total:
        raise ValueError(f"count: expected an int in [1, {total}] (B*h*w tokens), got {count!r}")
    # unique keys: masked tokens (key = position) sort before the others (key = total + position)
    key = torch.arange(total, device=t.device) + (~t).to(torch.int64) * total
    index = torch.argsort(key)[:count]
    return index, t.sum() > count


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


def check_token_index(
    token_index,
    mask: torch.Tensor,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    *,
    device: torch.device,
    name: str = "token_index",
    content: bool | None = None,
) -> None:
    """Check that ``token_index`` lists exactly the tokens of the ``grid`` holding masked pixels, each once.

    Always (from shapes, no device sync): a 1-D int64 tensor (TypeError otherwise) on ``device`` with at
    most ``B*h*w`` entries (ValueError). ``content``: also the values (range ``[0, B*h*w)``, no duplicate,
    no masked token missing, no token without a masked pixel; ValueError listing every kind found) --
    ``None`` checks them when the index is on the CPU and ``torch.compile`` is not tracing, ``True``
    always (synchronises with a CUDA device), ``False`` never.
    """
    if not isinstance(token_index, torch.Tensor) or token_index.dtype != torch.int64 or token_index.dim() != 1:
        is_tensor = isinstance(token_index, torch.Tensor)
        got = f"{tuple(token_index.shape)} {token_index.dtype}" if is_tensor else type(token_index).__name__
        raise TypeError(f"{name}: expected a 1-D int64 tensor of flattened (B, h, w) token indices, got {got}")
    if token_index.device != torch.device(device):
        raise ValueError(f"{name}: on {token_index.device}, expected {device}")
    B, (h, w) = mask.shape[0], grid
    total = B * h * w
    if token_index.numel() > total:
        raise ValueError(f"{name}: {token_index.numel()} indices for {total} tokens (B*h*w = {B}*{h}*{w}): duplicates")
    if content is None:
        content = token_index.device.type == "cpu" and not torch.compiler.is_compiling()
    if not content or torch.compiler.is_compiling():
        return
    reasons = []
    if token_index.numel():
        bad = token_index[(token_index < 0) | (token_index >= total)]
        if bad.numel():
            raise ValueError(
                f"{name}: {bad.numel()} indices outside [0, {total}) (B*h*w = {B}*{h}*{w}), e.g. {bad[:5].tolist()}"
            )
    counts = torch.bincount(token_index, minlength=total)
    expected = token_mask(mask, grid, image_size).flatten().to(counts.device)
    for what, sel in (
        ("listed more than once", counts > 1),
        ("holding masked pixels missing", expected & (counts == 0)),
        ("without a masked pixel listed", ~expected & (counts > 0)),
    ):
        found = sel.nonzero().squeeze(1)
        if found.numel():
            reasons.append(f"{found.numel()} tokens {what}, e.g. {found[:5].tolist()}")
    if reasons:
        raise ValueError(
            f"{name}: expected each token holding masked pixels exactly once (masked_token_index(mask, {tuple(grid)}, "
            f"{tuple(image_size)})): " + "; ".join(reasons)
        )


# ----------------------------------------------------------------------------------------------------
# checks, reference, op


def _check_inputs(features, weight, bias, images, mask, token_index, eps, loss, beta, norm_target, check_index) -> int:
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
    check_options(eps, loss, "masked", beta)
    check_norm_target(norm_target, (H, W))
    if check_index is not None and not isinstance(check_index, bool):
        raise TypeError(f"check_index: expected None, True or False, got {check_index!r}")
    if token_index is not None:
        check_token_index(token_index, mask, (h, w), (H, W), device=features.device, content=check_index)
    return s


def not_supported_reasons(features, weight, images, mask, *, norm_target: int | None = None) -> list[str]:
    """Every reason why the Triton loss cannot take the gathered rows of these inputs (empty: it can)."""
    reasons = device_reasons(features, weight, images, mask)
    reasons += size_reasons(images=images, mask=mask)
    if norm_target is not None:
        reasons += norm_target_reasons(images)
    rows = features.shape[0] * features.shape[1] * features.shape[2]
    if rows * weight.shape[0] > INT32_LIMIT:
        reasons.append(f"the head output ({rows} x {weight.shape[0]}) is larger than the kernels' int32 indexing allows")
    if images.dim() == 4 and images.shape[1] > 0 and weight.shape[0] // images.shape[1] > MAX_TILE:
        reasons.append(f"a token's s*s = {weight.shape[0] // images.shape[1]} pixels exceed one tile ({MAX_TILE})")
    return reasons


def masked_rows_loss_reference(
    pred_rows, token_index, images, mask, *, eps=1e-5, loss="l1", beta=1.0, norm_target=None
):
    """The reference loss of gathered prediction rows ``(N, C*s*s)`` of tokens ``token_index``.

    Gathers the matching pixels (or normalised targets of the whole image) and full-resolution mask
    values (PixelShuffle order) and applies the official formula; ``m.sum()`` counts the whole mask.
    """
    B, C, H, W = images.shape
    N, K = pred_rows.shape
    s = math.isqrt(K // C)
    m_pix = upsample_mask(mask, (H, W)).to(torch.float32)  # (B, H, W)
    x_tok = F.pixel_unshuffle(targets(images, norm_target), s).permute(0, 2, 3, 1).reshape(-1, C, s * s)
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
    norm_target: int | None = None,
    check_index: bool | None = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`masked_head_loss` (gather + ``F.linear`` + reference loss of the rows)."""
    _check_inputs(features, weight, bias, images, mask, token_index, eps, loss, beta, norm_target, check_index)
    B, h, w, Fdim = features.shape
    if token_index is None:
        token_index = masked_token_index(mask, (h, w), tuple(images.shape[2:]))
    rows = features.reshape(B * h * w, Fdim).index_select(0, token_index)
    pred_rows = F.linear(rows, weight, bias)
    return masked_rows_loss_reference(
        pred_rows, token_index, images, mask, eps=eps, loss=loss, beta=beta, norm_target=norm_target
    )


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
    norm_target: int | None = None,
    check_index: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SimMIM loss of the linear head run only on the tokens that hold masked pixels.

    ``token_index`` (from :func:`masked_head_plan` / :func:`masked_token_index`; computed from the
    mask when None) must list every token holding a masked pixel, each once, in any order: checked by
    :func:`check_token_index` (its values on CPU indices, or anywhere with ``check_index=True``; see the
    module doc). ``norm_target``: as in ``masked_l1_loss``. Differentiable in ``features``, ``weight``
    and ``bias``.

    Equivalent PyTorch::

        masked_l1_loss(F.linear(features, weight, bias), images, mask, eps=eps, loss=loss, beta=beta,
                       norm_target=norm_target)
    """
    _check_inputs(features, weight, bias, images, mask, token_index, eps, loss, beta, norm_target, check_index)
    reasons = not_supported_reasons(features, weight, images, mask, norm_target=norm_target)
    if resolve_backend(OP, backend, reasons, features, weight, images, mask) == "reference":
        return masked_head_loss_reference(
            features, weight, bias, images, mask, token_index=token_index, eps=eps, loss=loss, beta=beta,
            norm_target=norm_target, check_index=False,
        )
    B, h, w, Fdim = features.shape
    if token_index is None:
        token_index = masked_token_index(mask, (h, w), tuple(images.shape[2:]))
    rows = features.reshape(B * h * w, Fdim).index_select(0, token_index)
    pred_rows = F.linear(rows, weight, bias)
    return fused_loss(
        pred_rows, images, mask, token_index, eps=eps, loss=loss, region="masked", beta=beta, norm_target=norm_target
    )
