"""Embedded default data set: real photographs shipped inside scikit-image (no download).

``default_data_dir()`` writes them once as JPEG files into a cache folder so that the normal
image-folder pipeline can read them; a first run needs no ``--data``.

All images listed in ``DEFAULT_IMAGE_NAMES`` are bundled in the scikit-image wheel (its
``skimage/data`` folder), so they load offline. ``page``, ``text``, ``logo``, ``colorwheel``,
``horse`` and the like are left out on purpose (text / graphics / binary, not photographs);
``cat`` is the same photo as ``chelsea``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import uuid
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_IMAGE_NAMES", "default_cache_dir", "default_data_dir", "load_default_image"]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_NAMES: list[str] = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
    "brick",
    "grass",
    "gravel",
    "camera",
    "moon",
    "coins",
]

JPEG_QUALITY = 90


def _loader(name: str) -> Callable[[], np.ndarray]:
    import skimage.data as skdata

    if name == "motorcycle_left":
        return lambda: skdata.stereo_motorcycle()[0]
    if name == "motorcycle_right":
        return lambda: skdata.stereo_motorcycle()[1]
    return getattr(skdata, name)


def load_default_image(name: str) -> Image.Image:
    """One bundled scikit-image photograph as an 8-bit RGB PIL image (grayscale -> RGB)."""
    if name not in DEFAULT_IMAGE_NAMES:
        raise ValueError(f"unknown default image {name!r}; choose from {DEFAULT_IMAGE_NAMES}")
    arr = np.asarray(_loader(name)())
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"default image {name!r} has unexpected shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def default_cache_dir() -> pathlib.Path:
    """``$SIMMIM_FAST_CACHE`` if set, else ``~/.cache/simmim_fast``."""
    env = os.environ.get("SIMMIM_FAST_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path("~/.cache/simmim_fast").expanduser()


def _write_jpeg_atomic(img: Image.Image, dest: pathlib.Path) -> None:
    # The temporary name does not end in an image extension, so a leftover is never picked up.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def default_data_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Folder ``<cache_dir>/default_images`` holding the default photographs as JPEGs.

    Files are written only if missing, each atomically (temporary file + ``os.replace``), so
    several processes (e.g. torchrun ranks) may call this concurrently. Images that fail to load
    from scikit-image are skipped with a warning; at least one image must be available.
    """
    base = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = base / "default_images"
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name in DEFAULT_IMAGE_NAMES:
        dest = out / f"{name}.jpg"
        if dest.exists():
            continue
        try:
            img = load_default_image(name)
        except Exception as exc:  # e.g. a scikit-image build without this file and no network
            logger.warning("default image %r unavailable from scikit-image: %s", name, exc)
            continue
        _write_jpeg_atomic(img, dest)
        written.append(name)
    if written:
        logger.info("wrote %d default images (scikit-image photographs) to %s", len(written), out)
    if not any((out / f"{n}.jpg").exists() for n in DEFAULT_IMAGE_NAMES):
        raise RuntimeError(f"no default image could be written to {out}; pass --data with an image folder")
    return out
