"""Labelled image folders for fine-tuning and linear probing, with the official fine-tuning transforms.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (the ImageNet layout the
official ``data_finetune.py`` reads); class names are the sorted sub-folder names of ``train`` and
``val`` must have the same ones. An empty class folder is an error naming it (it would still take a
label index; torchvision's ``ImageFolder`` refuses it too); hidden folders (``.name``) are not classes.
Each real file is one sample: symlink loops are followed once, a file reached twice counted once.
Unreadable files are named (the first few) and counted: in training the next file takes their place,
in evaluation (``on_unreadable="drop"``) they are left out, so no image is evaluated twice.

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

from .decode import to_rgb
from .folder import IMG_EXTENSIONS, UnreadableDataError, _real_id, walk_image_files
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ConvertRGB

log = logging.getLogger("simmim_fast.data")

__all__ = ["class_folders", "scan_classes", "find_classes", "ClassificationFolder", "classification_collate", "build_train_transform",
           "build_eval_transform", "build_mixup", "ShardSampler", "split_dirs", "embedded_classification_dir"]


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders of ``root``: its sub-folders (symlinks followed), hidden ones
    (a name starting with ``.``, e.g. ``.ipynb_checkpoints``) left out. Files directly in ``root`` are
    ignored, as torchvision's ``ImageFolder`` ignores them."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: {root} does not exist or is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_classes(root: str | os.PathLike, classes: Sequence[str] | None = None
                 ) -> tuple[list[str], list[tuple[pathlib.Path, int]]]:
    """``(classes, samples)``: the class names (default :func:`class_folders`) and ``(path, label)`` of
    every image under ``root/<class>/`` (recursive, sorted, label = position of the class).

    Each real file is one sample (:func:`walk_image_files`: symlink loops followed once, a file reached
    by two paths counted once, under the first class in sorted order); a walk never enters another
    class folder or the data root (a link from ``cat/`` to ``..`` does not make ``dog``'s images cats).

    Empty class folders are an error (``ValueError`` naming each of them): a class without images would
    still take a label index, so the labels would not be those of the folder names alone, and
    torchvision's ``ImageFolder`` refuses such a folder as well. Remove the folder or add images.
    """
    root = pathlib.Path(root)
    classes = class_folders(root) if classes is None else list(classes)
    for c in classes:
        if not (root / c).is_dir():
            raise FileNotFoundError(f"--data: class folder {root / c} does not exist")
    fence = {_real_id(root)} | {_real_id(root / c) for c in classes}  # no walk enters another class
    seen: set = set()
    samples: list[tuple[pathlib.Path, int]] = []
    empty: list[str] = []
    for label, c in enumerate(classes):
        folder = root / c
        files = walk_image_files(folder, seen=seen, fence=fence - {_real_id(folder)})
        if not files:
            shared = bool(walk_image_files(folder))  # its files are all under an earlier class already
            empty.append(f"{folder}" + (" (its images are those of an earlier class folder: a symlink?)" if shared else ""))
        samples.extend((f, label) for f in files)
    if empty:
        raise ValueError(
            f"--data: {len(empty)} class folder(s) hold no images: {'; '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}. A class folder needs at least one image "
            f"({', '.join(IMG_EXTENSIONS)}): an empty one would still take a label index; remove it or add images"
        )
    return classes, samples


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of ``root`` (:func:`class_folders`); an empty class folder is a
    ``ValueError`` naming it (:func:`scan_classes`)."""
    return scan_classes(root)[0]


def split_dirs(root: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """``(root/train, root/val, classes)`` checked: both exist, at least 2 classes, the same classes,
    no empty class folder in either."""
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
    val_classes = class_folders(val)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ValueError(
            f"--data: train and val class folders differ (only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    find_classes(val)  # no empty class folder in val either
    return train, val, classes


UNREADABLE = ("next", "drop")


class ClassificationFolder(Dataset):
    """``root/<class>/**/<image>`` -> ``(image tensor, label int, skipped int)``.

    ``classes`` fixes the label order (default: ``find_classes(root)``; empty class folders are an
    error, :func:`scan_classes`). Unreadable files (not an image, truncated, no permission) are named in
    a warning (the first ``NAMED_SKIPS`` per process) and counted in ``skipped``; what takes their place
    is ``on_unreadable``:

    ``"next"`` (training): the next readable file, with its own label, as in pretraining; ``max_skip``
        unreadable files may be passed over for one sample before ``RuntimeError``.
    ``"drop"`` (evaluation): nothing. The sample is ``(None, label, 1)`` and
        :func:`classification_collate` leaves it out of the batch, so every readable file is evaluated
        exactly once and an unreadable one is never replaced by a duplicate of another.
    """

    #: how many distinct unreadable files each process names in a warning (the rest are only counted)
    NAMED_SKIPS = 5

    def __init__(self, root: str | os.PathLike, *, transform: Callable, classes: Sequence[str] | None = None,
                 max_skip: int = 64, on_unreadable: str = "next"):
        if on_unreadable not in UNREADABLE:
            raise ValueError(f"on_unreadable: expected one of {', '.join(UNREADABLE)}, got {on_unreadable!r}")
        if isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 0:
            raise ValueError(f"max_skip: expected an int >= 0, got {max_skip!r}")
        self.root = pathlib.Path(root)
        self.classes, self.samples = scan_classes(self.root, classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if not self.samples:
            raise ValueError(f"--data: no images under {self.root} for classes {self.classes[:5]}")
        self.transform = transform
        self.max_skip = max_skip
        self.on_unreadable = on_unreadable

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _name_skipped(self, path, exc: BaseException) -> None:
        named = self.__dict__.setdefault("_named_skips", set())
        if path in named or len(named) >= self.NAMED_SKIPS:
            return
        named.add(path)
        more = " (further unreadable files are only counted)" if len(named) == self.NAMED_SKIPS else ""
        log.warning("skipping unreadable image %s: %s: %s%s", path, type(exc).__name__, str(exc)[:200], more)

    def __getitem__(self, key):
        """``key``: an index, or ``(index, item_seed)``: the augmentation then draws from ``item_seed``
        alone (python ``random``, numpy and torch CPU generators, all restored afterwards), so a
        resumed run sees the same augmented samples whatever the number of loader workers."""
        index, item_seed = (key if isinstance(key, (tuple, list)) else (key, None))
        index = int(index)
        n = len(self.samples)
        last = None
        tries = 1 if self.on_unreadable == "drop" else min(self.max_skip + 1, n)
        for skipped in range(tries):
            path, label = self.samples[(index + skipped) % n]
            try:
                with Image.open(path) as img:
                    img.load()
                    img = to_rgb(img)
            except Exception as e:  # unreadable: named once, counted; replaced or dropped
                last = e
                self._name_skipped(path, e)
                if self.on_unreadable == "drop":
                    return None, label, 1
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
        raise UnreadableDataError(f"data: could not read any image after {tries} tries from index {index} under "
                                  f"{self.root} (max_skip={self.max_skip}): {type(last).__name__}: {last}") from last


def classification_collate(batch):
    """``[(image, label, skipped)]`` -> ``(images (B, 3, S, S), labels (B,) int64, skipped total)``.

    Samples without an image (``on_unreadable="drop"``) are left out and counted in ``skipped``; a batch
    of only such samples gives ``images`` of shape ``(0,)`` and no labels (skip it: ``labels.numel() == 0``).
    """
    kept = [b for b in batch if b[0] is not None]
    skipped = int(sum(b[2] for b in batch))
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([b[0] for b in kept])
    labels = torch.tensor([b[1] for b in kept], dtype=torch.long)
    return images, labels, skipped


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
