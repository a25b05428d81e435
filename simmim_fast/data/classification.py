"""Labelled image folders for fine-tuning and linear probing, with the official fine-tuning transforms.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (the ImageNet layout the
official ``data_finetune.py`` reads); class names are the sorted sub-folder names of ``train`` and
``val`` must have the same ones. Unreadable files are skipped (the next file is used) and counted.

Transforms (official ``data/data_finetune.py``, through timm's ``create_transform``):
    train  RandomResizedCrop (bicubic) + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + Normalize +
           RandomErasing 0.25 (pixel mode); images of 32 px or less use RandomCrop(size, padding=4)
    eval   Resize(256/224 * size, bicubic) + CenterCrop(size) + Normalize (``TEST.CROP``)
Mixup / CutMix: timm ``Mixup`` (alpha 0.8 / 1.0, per batch, switch prob 0.5, label smoothing 0.1).

``embedded_classification_dir()`` builds a small labelled set from the embedded photographs (the
task: which photograph does a random crop come from), so that the CLIs run with no ``--data``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import random
import shutil
import uuid
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from .folder import IMG_EXTENSIONS
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ConvertRGB

log = logging.getLogger("simmim_fast.data")

__all__ = ["find_classes", "ClassificationFolder", "classification_collate", "build_train_transform",
           "build_eval_transform", "build_mixup", "ShardSampler", "split_dirs", "embedded_classification_dir"]


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold at least one image (searched recursively)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: {root} does not exist or is not a folder")
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(f.suffix.lower() in IMG_EXTENSIONS for f in d.rglob("*") if f.is_file()):
            classes.append(d.name)
    return classes


def split_dirs(root: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """``(root/train, root/val, classes)`` checked: both exist, at least 2 classes, the same classes."""
    root = pathlib.Path(root).expanduser()
    train, val = root / "train", root / "val"
    for d in (train, val):
        if not d.is_dir():
            raise FileNotFoundError(
                f"--data: expected {root}/train/<class>/<images> and {root}/val/<class>/<images>; {d} is missing"
            )
    classes = find_classes(train)
    if len(classes) < 2:
        raise ValueError(f"--data: {train} must hold at least 2 class folders with images, found {classes}")
    val_classes = find_classes(val)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ValueError(
            f"--data: train and val class folders differ (only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    return train, val, classes


class ClassificationFolder(Dataset):
    """``root/<class>/**/<image>`` -> ``(image tensor, label int, skipped int)``.

    ``classes`` fixes the label order (default: ``find_classes(root)``); ``max_skip`` unreadable files
    may be passed over for one sample before ``RuntimeError``.
    """

    def __init__(self, root: str | os.PathLike, *, transform: Callable, classes: Sequence[str] | None = None,
                 max_skip: int = 64):
        self.root = pathlib.Path(root)
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[pathlib.Path, int]] = []
        for c in self.classes:
            files = sorted(f for f in (self.root / c).rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if not self.samples:
            raise ValueError(f"--data: no images under {self.root} for classes {self.classes[:5]}")
        self.transform = transform
        self.max_skip = max_skip

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        """``key``: an index, or ``(index, item_seed)``: the augmentation then draws from ``item_seed``
        alone (python ``random``, numpy and torch CPU generators, all restored afterwards), so a
        resumed run sees the same augmented samples whatever the number of loader workers."""
        index, item_seed = (key if isinstance(key, (tuple, list)) else (key, None))
        index = int(index)
        n = len(self.samples)
        last = None
        for skipped in range(min(self.max_skip + 1, n)):
            path, label = self.samples[(index + skipped) % n]
            try:
                with Image.open(path) as img:
                    img.load()
                    img = img.convert("RGB")
            except Exception as e:  # unreadable: take the next file (its own label)
                last = e
                continue
            if item_seed is None:
                return self.transform(img), label, skipped
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(int(item_seed))
                    random.seed(int(item_seed))
                    np.random.seed(int(item_seed) % (2**32))
                    image = self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
            return image, label, skipped
        raise RuntimeError(f"could not read any image after {self.max_skip + 1} tries from index {index}: {last}")


def classification_collate(batch):
    """``[(image, label, skipped)]`` -> ``(images (B, 3, S, S), labels (B,) int64, skipped total)``."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels, int(sum(b[2] for b in batch))


def build_train_transform(
    img_size: int, *, auto_augment: str | None = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
    reprob: float = 0.25, remode: str = "pixel", recount: int = 1, interpolation: str = "bicubic",
) -> Callable:
    """The official fine-tuning training transform (timm ``create_transform``), PIL image -> ``(3, S, S)``."""
    from timm.data import create_transform

    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"--img-size: expected a positive int, got {img_size!r}")
    if not 0.0 <= reprob <= 1.0:
        raise ValueError(f"--reprob: expected a probability in [0, 1], got {reprob!r}")
    aa = None if auto_augment in (None, "", "none") else auto_augment
    try:
        t = create_transform(
            input_size=img_size, is_training=True, color_jitter=color_jitter if color_jitter > 0 else None,
            auto_augment=aa, re_prob=reprob, re_mode=remode, re_count=recount, interpolation=interpolation,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
    except (AssertionError, KeyError, ValueError) as e:
        raise ValueError(f"--auto-augment / augmentation options: timm rejected them ({e})") from e
    if img_size <= 32:  # official: small images get RandomCrop(padding=4) instead of RandomResizedCrop
        t.transforms[0] = T.RandomCrop(img_size, padding=4)
    _patch_posterize(t)
    return t


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's posterize with Pillow's pre-13 meaning of 0 bits (a black image); Pillow >= 13 raises for 0."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    """RandAugment at magnitude 10 (m9 + noise) asks for 0 bits: give its posterize ops the safe function."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_any_bits


def build_eval_transform(img_size: int, *, interpolation: str = "bicubic", crop: bool = True) -> T.Compose:
    """Official evaluation transform: resize ``int(256/224 * S)`` + center crop ``S`` (or resize to ``S x S``)."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"--img-size: expected a positive int, got {img_size!r}")
    mode = T.InterpolationMode(interpolation)
    t: list = [ConvertRGB()]
    if img_size > 32:
        if crop:
            t += [T.Resize(int((256 / 224) * img_size), interpolation=mode), T.CenterCrop(img_size)]
        else:
            t += [T.Resize((img_size, img_size), interpolation=mode)]
    t += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(t)


def build_mixup(*, num_classes: int, mixup: float, cutmix: float, prob: float = 1.0, switch_prob: float = 0.5,
                mode: str = "batch", label_smoothing: float = 0.1):
    """timm ``Mixup`` when mixup or cutmix is on (alpha > 0), else ``None``."""
    from timm.data import Mixup

    for name, v in (("--mixup", mixup), ("--cutmix", cutmix)):
        if v < 0:
            raise ValueError(f"{name}: expected an alpha >= 0, got {v!r}")
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"--mixup-mode: expected batch, pair or elem, got {mode!r}")
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` of a data set: every sample once over all ranks, no padding."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---- embedded labelled data ------------------------------------------------------------------
EMBEDDED_TRAIN_PER_CLASS = 16
EMBEDDED_VAL_PER_CLASS = 4
EMBEDDED_SIZE = 256


def embedded_classification_dir(*, train_per_class: int = EMBEDDED_TRAIN_PER_CLASS,
                                val_per_class: int = EMBEDDED_VAL_PER_CLASS) -> pathlib.Path:
    """A cached ``train/`` + ``val/`` folder: random crops of each embedded photograph, one class per photo.

    Crops cover 10-40 % of the photo (fixed seed: the same files every time), saved as 256 px JPEGs;
    train and val crops are different draws. Built once into ``default_cache_dir()/finetune_photos``.
    """
    from .default_data import DEFAULT_IMAGE_NAMES, default_cache_dir, load_default_image

    root = default_cache_dir() / f"finetune_photos_{train_per_class}_{val_per_class}"
    if (root / ".complete").is_file():
        return root
    tmp = root.with_name(root.name + f".{uuid.uuid4().hex}.tmp")
    rng = np.random.default_rng(0)
    for name in DEFAULT_IMAGE_NAMES:
        img = load_default_image(name)
        W, H = img.size
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            out = tmp / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                area = rng.uniform(0.1, 0.4) * W * H
                side = int(min(W, H, max(16, np.sqrt(area))))
                x0 = int(rng.integers(0, W - side + 1))
                y0 = int(rng.integers(0, H - side + 1))
                crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((EMBEDDED_SIZE, EMBEDDED_SIZE), Image.BICUBIC)
                crop.save(out / f"{i:03d}.jpg", quality=90)
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
