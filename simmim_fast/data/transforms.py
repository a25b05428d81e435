"""SimMIM pretraining augmentation (official recipe) and a denormalisation helper.

The augmentation matches ``data/data_simmim.py`` of microsoft/SimMIM:
RGB conversion, ``RandomResizedCrop(img_size, scale=(0.67, 1), ratio=(3/4, 4/3))``
(bilinear), ``RandomHorizontalFlip()``, ``ToTensor()`` and ImageNet ``Normalize``.
"""
from __future__ import annotations

import torch
import torchvision.transforms as T
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .decode import to_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ConvertRGB", "build_pretrain_transform", "denormalize"]

IMAGENET_MEAN: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_DEFAULT_STD)


class ConvertRGB:
    """Convert a PIL image to 8-bit RGB if it is not already, 16-bit images scaled (:func:`to_rgb`);
    picklable, unlike a lambda."""

    def __call__(self, img):
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def build_pretrain_transform(img_size: int = 192) -> T.Compose:
    """Official SimMIM pretraining augmentation for a PIL image -> normalised (3, img_size, img_size) tensor.

    Randomness comes from torch's global CPU generator (torchvision v1 transforms), so seeding
    ``torch.default_generator`` before the call makes crop and flip reproducible.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    return T.Compose([
        ConvertRGB(),
        T.RandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Invert the ImageNet ``Normalize`` of (3, H, W) or (B, 3, H, W) images; result clamped to [0, 1].

    Returns a float32 tensor on the input's device (for visualisation).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"denormalize expects a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"denormalize expects (3, H, W) or (B, 3, H, W) images, got shape {tuple(images.shape)}")
    x = images.float()
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp_(0.0, 1.0)
