"""Occlusion-invariance probe: CKA between encoder features of the same images under two masks.

The work behind ``python -m simmim_fast.probe`` (its docstring shows the commands).
Kong & Zhang ("Understanding Masked Image Modeling via Learning Occlusion Invariant Feature") read
MIM as learning features invariant to occlusion. This probe measures it directly: the images go
through the pretraining encoder twice with two independent SimMIM masks (mask token substituted,
as in pretraining) and the linear CKA of the two feature sets is printed (1 = the same
representation up to rotation and scale). For reference it also prints the CKA between a masked
view and the unmasked image. Features: ``mean`` = one vector per image (final features averaged over
positions), ``tokens`` = one per position (CKA over ``B*h*w`` samples). Few images bias linear CKA
upwards: compare numbers taken with the same images and settings.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..data.masking import MaskGenerator
from ..models.interchange import load_pretraining_model, read_checkpoint

log = logging.getLogger("simmim_fast.probe")

__all__ = ["linear_cka", "occlusion_invariance", "ProbeResult", "probe_checkpoint"]

POOLS = ("mean", "tokens")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear centered kernel alignment of two feature sets of the same ``N`` samples.

    x ``(N, D1)``, y ``(N, D2)`` (any float dtype, same device) -> float64 scalar in ``[0, 1]``;
    symmetric, 1 for identical features, invariant to orthogonal transforms and isotropic scaling.
    Computed in float64, through the ``N x N`` Gram matrices when ``N`` is the smaller size.

    Equivalent PyTorch: ``xc, yc = x - x.mean(0), y - y.mean(0)``;
    ``(yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())``.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a float (N, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: expected the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"x: CKA needs at least 2 samples, got {x.shape[0]}")
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        kx, ky = xc @ xc.T, yc @ yc.T
        num, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        num, nx, ny = (yc.T @ xc).norm() ** 2, (xc.T @ xc).norm(), (yc.T @ yc).norm()
    if float(nx) == 0.0 or float(ny) == 0.0:
        raise ValueError("x, y: CKA is undefined for constant features (zero variance across samples)")
    return num / (nx * ny)


def _pool(features: torch.Tensor, pool: str) -> torch.Tensor:
    """``(B, h, w, C)`` -> ``(B, C)`` (mean) or ``(B*h*w, C)`` (tokens)."""
    if pool == "mean":
        return features.mean(dim=(1, 2))
    return features.reshape(-1, features.shape[-1])


@torch.no_grad()
def occlusion_invariance(
    encoder: nn.Module, images: torch.Tensor, mask_generator: MaskGenerator, *, pool: str = "mean",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """CKA of ``encoder(images, m1)`` vs ``encoder(images, m2)`` for two independent masks (and vs no mask).

    encoder: a SimMIM encoder (``forward(images, mask) -> (B, h, w, C)``); images ``(B, 3, S, S)``
    normalised. Returns ``{"masked_vs_masked", "masked_vs_unmasked"}``. Runs in eval mode.
    """
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    was = encoder.training
    encoder.eval()
    B = images.shape[0]
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    m1 = mask_generator.generate(B, generator=gen).to(images.device)
    m2 = mask_generator.generate(B, generator=gen).to(images.device)
    f1 = _pool(encoder(images, m1).float(), pool)
    f2 = _pool(encoder(images, m2).float(), pool)
    f0 = _pool(encoder(images, torch.zeros_like(m1)).float(), pool)
    encoder.train(was)
    return {"masked_vs_masked": float(linear_cka(f1, f2)), "masked_vs_unmasked": float(linear_cka(f1, f0))}


@dataclass
class ProbeResult:
    checkpoint: str
    step: int | None
    masked_vs_masked: float
    masked_vs_unmasked: float
    images: int


def _load_images(paths: Sequence[str] | None, img_size: int, num_images: int) -> torch.Tensor:
    from .visualize import build_eval_transform, collect_images, _load_rgb

    if paths is None:
        from ..data.default_data import default_data_dir

        paths = [str(default_data_dir())]
    files = collect_images(paths)
    tf = build_eval_transform(img_size)
    out = []
    for f in files:
        if len(out) >= num_images:
            break
        try:
            out.append(tf(_load_rgb(f)))
        except Exception:  # unreadable: skip, as the data sets do
            log.info("skipping unreadable image %s", f)
    if len(out) < 2:
        raise ValueError(f"--images: CKA needs at least 2 readable images, found {len(out)}")
    return torch.stack(out)


def probe_checkpoint(
    checkpoint: str | os.PathLike, *, images: Sequence[str] | None = None, num_images: int = 32,
    pool: str = "mean", mask_ratio: float | None = None, mask_patch_size: int | None = None,
    mask_strategy: str = "random", seed: int = 0, preset: str | None = None, device: str = "cpu",
    _image_cache: dict | None = None,
) -> ProbeResult:
    """Load a pretraining checkpoint (ours or official) and run :func:`occlusion_invariance` on images."""
    model, info = load_pretraining_model(read_checkpoint(checkpoint), preset=preset)
    size = info["img_size"]
    cache = _image_cache if _image_cache is not None else {}
    if size not in cache:
        cache[size] = _load_images(images, size, num_images)
    x = cache[size].to(device)
    gen = MaskGenerator(input_size=size, mask_patch_size=mask_patch_size or info["mask_patch_size"],
                        model_patch_size=model.patch_size, mask_ratio=info["mask_ratio"] if mask_ratio is None else mask_ratio,
                        strategy=mask_strategy)
    enc = model.encoder.to(device)
    res = occlusion_invariance(enc, x, gen, pool=pool, generator=torch.Generator().manual_seed(seed))
    return ProbeResult(str(info["path"]), info["step"], res["masked_vs_masked"], res["masked_vs_unmasked"], x.shape[0])
