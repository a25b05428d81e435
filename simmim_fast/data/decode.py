"""Decoded images to 8-bit RGB, 16-bit ones scaled (PIL's own ``convert("RGB")`` clips them).

PIL opens 16-bit grayscale files (PNG, TIFF) in mode ``I;16`` (``I;16B``/``I;16L``/``I;16N`` by byte
order) and some formats' 16-bit or 32-bit integer data in mode ``I``; ``Image.convert("RGB")`` keeps
the low 8 bits' range, clipping every value above 255, so a normal 16-bit photo comes out almost white.
Here those modes are scaled from ``0..65535`` to ``0..255`` (``round(v / 257)``, what DALI's decoder
does with the same files; mode ``I`` is read as 16-bit data, values outside ``0..65535`` clipped).
16-bit colour PNGs need nothing: PIL already opens them as 8-bit ``RGB``/``RGBA``. Every other mode
goes through ``convert("RGB")`` (``L``, ``P``, ``RGBA``, ``CMYK``, ...). Mode ``F`` (32-bit float) has
no agreed range and is converted as PIL does (clipped to ``0..255``).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SIXTEEN_BIT_MODES", "to_rgb"]

#: PIL modes holding 16-bit (or wider integer) single-channel data, scaled by :func:`to_rgb`
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image: 16-bit grayscale scaled to 8 bits, other modes ``convert("RGB")``.

    Equivalent PyTorch/PIL: ``img.convert("RGB")`` for 8-bit images; for ``I;16`` data
    ``Image.fromarray(((np.asarray(img) + 128) // 257).astype(np.uint8)).convert("RGB")``.
    """
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img)
        a = np.clip(a.astype(np.int64), 0, 65535)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")
