"""Reconstruction grids in the style of the SimMIM paper (Figs. 4-6).

One row per image, four columns::

    original | masked input | prediction | prediction pasted into the masked pixels

The masked input shows masked pixels as a blue diagonal hatch (:func:`mask_fill`); the last column
keeps the visible pixels of the original and takes only the masked pixels from the prediction.
Saved PNGs carry the column labels above the grid and a legend below it (:func:`annotate`).
Tiles are separated by ``PAD`` (2) pixels of white; there is no outer border, so a grid
of ``n`` rows of ``H x W`` images is ``(4 * W + 3 * PAD)`` wide and ``(n * H + (n - 1) * PAD)``
high.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAD",
    "MASK_GREY",
    "HATCH_COLOURS",
    "HEADER",
    "mask_fill",
    "annotate",
    "reconstruction_grid",
    "save_reconstruction_grid",
]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # (0.229, 0.224, 0.225)

PAD = 2  # white pixels between tiles
MASK_GREY = 0.5  # (kept for callers) the former flat fill of masked pixels
#: Masked pixels in the "masked input" column: a diagonal hatch of two blues (period 6 px), a pattern
#: that no prediction looks like (a flat grey fill could not be told from a grey texture's prediction).
HATCH_COLOURS = ((64, 112, 230), (200, 215, 255))
N_COLUMNS = 4
LABELS = ("original", "masked input", "prediction", "pred. pasted")
LEGEND = "blue hatch = masked cells; last column: visible original + predicted masked cells"
HEADER = 14  # px of the label strip above the grid in saved PNGs (and of the legend strip below)


def mask_fill(H: int, W: int) -> torch.Tensor:
    """``(3, H, W)`` float display values of the masked-pixel hatch (see :data:`HATCH_COLOURS`)."""
    y = torch.arange(H).view(H, 1)
    x = torch.arange(W).view(1, W)
    stripe = ((y + x) // 3) % 2  # (H, W) 0/1
    a, b = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) / 255.0 for c in HATCH_COLOURS)
    return torch.where(stripe.bool().unsqueeze(0), b, a)


def _as_cpu_float(x, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    t = t.detach()
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.float32)


def _validate(images: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    B, _, H, W = images.shape
    if B == 0 or H == 0 or W == 0:
        raise ValueError(f"images must have shape (B, 3, H, W) with B, H, W > 0, got {tuple(images.shape)}")
    if tuple(pred.shape) != tuple(images.shape):
        raise ValueError(
            f"pred must have shape (B, 3, H, W) = {tuple(images.shape)} matching images, "
            f"got {tuple(pred.shape)}"
        )
    if mask.dim() != 3:
        raise ValueError(
            f"mask must have shape (B, h, w) with B={B} and h, w dividing (H, W)=({H}, {W}), "
            f"got {tuple(mask.shape)}"
        )
    mb, h, w = mask.shape
    if mb != B or h == 0 or w == 0 or H % h != 0 or W % w != 0:
        raise ValueError(
            f"mask must have shape (B, h, w) with B={B} and h, w dividing (H, W)=({H}, {W}), "
            f"got {tuple(mask.shape)}"
        )


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) float in [0, 1] display space -> (..., H, W, C) uint8."""
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    x = (x * 255.0).round_().to(torch.uint8)
    return x.movedim(-3, -1)


def reconstruction_grid(
    images,
    mask,
    pred,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_images: int = 8,
) -> Image.Image:
    """Build the 4-column reconstruction grid as an RGB ``PIL.Image``.

    Args:
        images: ``(B, 3, H, W)`` float, normalised with ``mean``/``std``.
        mask: ``(B, h, w)`` with 1 = masked, 0 = visible (any dtype); ``h`` and ``w`` must
            divide ``H`` and ``W`` (patch- or mask-patch-level grids are upsampled by
            nearest-neighbour repetition).
        pred: ``(B, 3, H, W)`` float in the same normalised space as ``images``.
        mean, std: per-channel normalisation to undo.
        max_images: at most this many rows (the first images of the batch).

    Tensors may live on any device and have any float dtype.
    """
    if int(max_images) < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    images_t = _as_cpu_float(images, "images")
    mask_t = _as_cpu_float(mask, "mask")
    pred_t = _as_cpu_float(pred, "pred")
    _validate(images_t, mask_t, pred_t)

    mean_t = torch.as_tensor(tuple(float(m) for m in mean), dtype=torch.float32)
    std_t = torch.as_tensor(tuple(float(s) for s in std), dtype=torch.float32)
    if mean_t.shape != (3,) or std_t.shape != (3,):
        raise ValueError(f"mean and std must have 3 entries, got {tuple(mean)} and {tuple(std)}")
    mean_t = mean_t.view(1, 3, 1, 1)
    std_t = std_t.view(1, 3, 1, 1)

    n = min(images_t.shape[0], int(max_images))
    images_t, mask_t, pred_t = images_t[:n], mask_t[:n], pred_t[:n]
    _, _, H, W = images_t.shape

    # mask -> pixel level bool (n, 1, H, W)
    m = mask_t > 0.5
    m = m.repeat_interleave(H // m.shape[1], dim=1).repeat_interleave(W // m.shape[2], dim=2)
    m = m.unsqueeze(1)

    orig = images_t * std_t + mean_t
    rec = pred_t * std_t + mean_t
    masked_in = torch.where(m, mask_fill(H, W).unsqueeze(0).expand_as(orig), orig)
    pasted = torch.where(m, rec, orig)

    # (n, 4, H, W, 3) uint8 tiles
    tiles = _to_uint8(torch.stack([orig, masked_in, rec, pasted], dim=1)).numpy()

    grid_h = n * H + (n - 1) * PAD
    grid_w = N_COLUMNS * W + (N_COLUMNS - 1) * PAD
    canvas = np.full((grid_h, grid_w, 3), 255, dtype=np.uint8)
    for r in range(n):
        y = r * (H + PAD)
        for c in range(N_COLUMNS):
            x = c * (W + PAD)
            canvas[y : y + H, x : x + W] = tiles[r, c]
    return Image.fromarray(canvas)  # (H, W, 3) uint8 -> RGB


def _fit(draw, text: str, width: int, font) -> str:
    """``text`` shortened (with ".") until it fits ``width`` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "." if len(text) > 2 else ""
    return text


def annotate(grid: Image.Image, tile_width: int) -> Image.Image:
    """The grid with the column labels above it and the legend below (white strips of :data:`HEADER` px)."""
    from PIL import ImageDraw, ImageFont

    w, h = grid.size
    out = Image.new("RGB", (w, h + 2 * HEADER), (255, 255, 255))
    out.paste(grid, (0, HEADER))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for c, label in enumerate(LABELS):
        text = _fit(draw, label, tile_width - 2, font)
        x0 = c * (tile_width + PAD)
        draw.text((x0 + (tile_width - draw.textlength(text, font=font)) / 2, 1), text, fill=(0, 0, 0), font=font)
    draw.text((2, h + HEADER + 1), _fit(draw, LEGEND, w - 4, font), fill=(60, 60, 60), font=font)
    return out


def save_reconstruction_grid(path, images, mask, pred, *, labels: bool = True, **kw) -> pathlib.Path:
    """Render :func:`reconstruction_grid` and write it as PNG atomically.

    ``labels``: add the column labels above and the legend below (:func:`annotate`; the image is then
    ``2 * HEADER`` px taller). The image is written to a temporary file in the destination directory
    and moved into place with ``os.replace``; parent directories are created. Returns the path written.
    """
    path = pathlib.Path(path)
    img = reconstruction_grid(images, mask, pred, **kw)
    if labels:
        img = annotate(img, int(images.shape[-1]))  # tile width W (images were validated by the grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the PNG the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
