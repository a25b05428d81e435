"""Image-folder dataset for SimMIM pretraining (labels ignored; any folder tree works).

Every sample is reproducible from ``(index, item_seed)``: the crop/flip use torch's CPU generator
seeded with ``item_seed`` (inside ``torch.random.fork_rng`` so the caller's RNG is untouched) and
the mask uses ``np.random.default_rng(item_seed)``. Results therefore do not depend on the number
of DataLoader workers or on the order in which samples are produced.

Unreadable files (not an image, truncated, permission error, ...) are skipped silently by moving
on to the next index; the number of skips is returned with each sample so the caller can report
an aggregate count instead of one log line per file.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from .decode import to_rgb

__all__ = ["IMG_EXTENSIONS", "find_images", "walk_image_files", "SimMIMImageDataset", "simmim_collate"]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_SEED_MASK = (1 << 63) - 1


def _real_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` finally points to, or None when it cannot be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_image_files(root: str | os.PathLike, *, seen: set | None = None, fence: frozenset | set = frozenset()
                     ) -> list[pathlib.Path]:
    """Image files under ``root`` in sorted depth-first order, each real file and folder once.

    Symlinked folders and files are followed, but every real folder is entered at most once and every
    real file listed at most once (identity ``(st_dev, st_ino)``), so a link back to a parent folder
    (a loop, which ``os.walk(followlinks=True)`` follows until the path is too long) or a second path to
    the same file (a symlink, a hard link) adds nothing. Of several paths to one file the first in
    sorted order is kept. ``seen`` carries those identities across calls (one set for several class
    folders); ``fence`` holds identities of folders never entered below ``root`` (the other class
    folders and the data root: a link out of one class folder does not take another class's images).
    Folders that cannot be listed are skipped with a warning; broken links are ignored.
    """
    seen = set() if seen is None else seen
    root = pathlib.Path(root)
    root_id = _real_id(root)
    if root_id is None or root_id in seen:
        return []
    seen.add(root_id)
    found: list[pathlib.Path] = []
    stack: list[tuple[pathlib.Path, list[os.DirEntry], int, int]] = []  # folder, entries, next, st_dev

    def enter(folder: pathlib.Path, dev: int) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list folder %s (%s: %s); its images are left out", folder, type(exc).__name__,
                           exc.strerror or exc)
            entries = []
        stack.append((folder, entries, 0, dev))

    enter(root, root_id[0])
    while stack:
        folder, entries, i, dev = stack[-1]
        if i == len(entries):
            stack.pop()
            continue
        stack[-1] = (folder, entries, i + 1, dev)
        entry = entries[i]
        try:
            is_dir = entry.is_dir()  # follows symlinks
            is_file = not is_dir and entry.is_file()
        except OSError:
            continue
        if is_dir:
            ident = _real_id(entry.path)
            if ident is not None and ident not in seen and ident not in fence:
                seen.add(ident)
                enter(folder / entry.name, ident[0])
        elif is_file and entry.name.lower().endswith(IMG_EXTENSIONS):
            try:  # a plain file is on its folder's device and scandir knows its inode: no stat call
                ident = _real_id(entry.path) if entry.is_symlink() else (dev, entry.inode())
            except OSError:
                continue
            if ident is not None and ident not in seen:
                seen.add(ident)
                found.append(folder / entry.name)
    return found


def find_images(root: str | os.PathLike) -> list[pathlib.Path]:
    """All image files under ``root`` (recursive, case-insensitive extension match), sorted.

    Works for an ImageFolder layout (``root/<class>/<img>``) or any folder tree. Symlinked folders are
    followed once per real folder and each real file is listed once (:func:`walk_image_files`): a
    symlink loop neither hangs the scan nor repeats images. Order is deterministic: sorted by path
    components relative to root.
    """
    root_path = pathlib.Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"--data / root {str(root_path)!r} does not exist")
    if not root_path.is_dir():
        raise ValueError(f"--data / root {str(root_path)!r} is not a directory")
    found = walk_image_files(root_path)
    if not found:
        raise ValueError(
            f"no images found under {str(root_path)!r} (looked recursively for extensions "
            f"{', '.join(IMG_EXTENSIONS)}, case-insensitive)"
        )
    return found


def _derive_seed(base_seed: int, index: int) -> int:
    """Deterministic 63-bit seed for (dataset seed, index) when the key carries no item seed."""
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & _SEED_MASK


def _load_rgb(path: pathlib.Path) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (16-bit images scaled, :func:`to_rgb`); raises on any
    problem (including truncation)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class UnreadableDataError(RuntimeError, ValueError):
    """No readable image within ``max_skip`` files of a sample: bad input (a ``ValueError``, so the CLIs exit 2
    with this one line), and a ``RuntimeError`` as before. One message argument, so that a DataLoader worker
    re-raises it in the main process with its type."""


class SimMIMImageDataset(Dataset):
    """Images under ``root`` -> ``(image (3,S,S) float32, mask (h,w) int64, skipped int)``.

    Args:
        root: folder searched recursively by :func:`find_images`.
        transform: callable PIL image -> tensor (e.g. :func:`build_pretrain_transform`); it must take
            its randomness from torch's global CPU generator.
        mask_generator: callable ``mask_generator(rng=np.random.Generator) -> np.ndarray (h, w)``.
        seed: dataset seed used to derive per-item seeds for plain integer keys.
        max_skip: how many unreadable files may be skipped for one sample before ``RuntimeError``.

    Keys: an int ``index`` or a tuple ``(index, item_seed)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable,
        mask_generator: Callable[..., np.ndarray],
        seed: int = 0,
        max_skip: int = 64,
    ) -> None:
        if isinstance(max_skip, bool) or not isinstance(max_skip, (int, np.integer)) or max_skip < 0:
            raise ValueError(f"max_skip must be a non-negative int, got {max_skip!r}")
        self.root = pathlib.Path(root).expanduser()
        self.files: list[pathlib.Path] = find_images(self.root)
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.max_skip = int(max_skip)
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            logger.warning(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by some other code: truncated images "
                "will be decoded partially instead of being skipped"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(root={str(self.root)!r}, images={len(self.files)}, "
                f"seed={self.seed}, max_skip={self.max_skip})")

    def _parse_key(self, key) -> tuple[int, int]:
        if isinstance(key, (tuple, list)):
            if len(key) != 2:
                raise TypeError(f"key must be an index or (index, item_seed), got {key!r}")
            index, item_seed = key
        else:
            index, item_seed = key, None
        if isinstance(index, torch.Tensor):
            index = index.item()
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {index!r}")
        index = int(index)
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of {n} images")
        index %= n
        if item_seed is None:
            item_seed = _derive_seed(self.seed, index)
        else:
            if isinstance(item_seed, torch.Tensor):
                item_seed = item_seed.item()
            if isinstance(item_seed, bool) or not isinstance(item_seed, (int, np.integer)) or item_seed < 0:
                raise ValueError(f"item_seed must be a non-negative int, got {item_seed!r}")
            item_seed = int(item_seed)
        return index, item_seed

    #: how many distinct unreadable files each process names in a warning (the rest are only counted)
    NAMED_SKIPS = 5

    def _name_skipped(self, path, exc: BaseException) -> None:
        named = self.__dict__.setdefault("_named_skips", set())
        if path in named or len(named) >= self.NAMED_SKIPS:
            return
        named.add(path)
        more = " (further unreadable files are only counted)" if len(named) == self.NAMED_SKIPS else ""
        logger.warning("skipping unreadable image %s: %s: %s%s", path, type(exc).__name__, str(exc)[:200], more)

    def _load_with_skip(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.files)
        attempts = min(self.max_skip + 1, n)
        tried: list[str] = []
        last_error: BaseException | None = None
        for skipped in range(attempts):
            path = self.files[(index + skipped) % n]
            try:
                return _load_rgb(path), skipped
            except Exception as exc:  # any unreadable file is skipped; named once, the first few only
                tried.append(str(path))
                last_error = exc
                self._name_skipped(path, exc)
        shown = tried[-5:]
        what = (f"none of the {n} files under {str(self.root)!r} is a readable image" if len(tried) == n
                else f"could not read any image after {len(tried)} tries starting at index {index}")
        raise UnreadableDataError(
            f"data: {what} (max_skip={self.max_skip}); last files tried: {shown}; "
            f"last error: {type(last_error).__name__}: {last_error}"
        ) from last_error

    def __getitem__(self, key):
        index, item_seed = self._parse_key(key)
        img, skipped = self._load_with_skip(index)
        with torch.random.fork_rng(devices=[]):
            # Seed only the CPU generator (torch.manual_seed would also reseed CUDA generators,
            # which fork_rng(devices=[]) does not restore).
            torch.default_generator.manual_seed(item_seed)
            image = self.transform(img)
        rng = np.random.default_rng(item_seed)
        mask = np.ascontiguousarray(self.mask_generator(rng=rng))
        return image, torch.from_numpy(mask).long(), skipped


def simmim_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack ``(image, mask, skipped)`` samples into ``(B,3,S,S), (B,h,w), total skipped``."""
    if len(batch) == 0:
        raise ValueError("simmim_collate got an empty batch")
    images = torch.stack([b[0] for b in batch])
    masks = torch.stack([torch.as_tensor(b[1]) for b in batch])
    skipped = int(sum(int(b[2]) for b in batch))
    return images, masks, skipped
