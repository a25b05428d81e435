"""Shared plumbing of the public ops: backend choice, argument checks, mask upsampling.

Every op takes ``backend="auto" | "triton" | "reference"``. ``auto`` picks Triton when the op's
capability check returns no reasons, else the reference. Forcing ``triton`` on an input it cannot
take raises ``NotImplementedError`` listing every reason (in the style of xformers' ``ops/fmha``).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

BACKENDS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpret_mode() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Reasons why Triton cannot run on these tensors' device (empty list: it can)."""
    reasons = []
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on different devices: {sorted(str(d) for d in devices)}")
    for d in devices:
        if d.type == "cuda":
            continue
        if d.type == "cpu" and triton_interpret_mode():
            continue
        reasons.append(
            f"device {d} is not CUDA (Triton runs on CPU only with TRITON_INTERPRET=1 set before import)"
        )
    return reasons


def resolve_backend(op: str, backend: str, reasons: Sequence[str]) -> str:
    """Return ``"triton"`` or ``"reference"`` for ``backend`` given the capability ``reasons``."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if reasons:
            raise NotImplementedError(
                f"{op}: backend='triton' cannot take this input: " + "; ".join(reasons)
            )
        return "triton"
    return "reference" if reasons else "triton"


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")


def check_mask_dtype(name: str, mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool, integer or float 0/1 tensor, got {mask.dtype}")


def check_grid(name: str, grid: tuple[int, int], full: tuple[int, int], full_name: str) -> tuple[int, int]:
    """Check that a mask grid ``(h, w)`` divides ``full`` = ``(H, W)``; return the repeat factors."""
    h, w = grid
    H, W = full
    if h <= 0 or w <= 0 or H % h != 0 or W % w != 0:
        raise ValueError(
            f"{name}: grid {tuple(grid)} must divide the {full_name} {tuple(full)} "
            f"(each side a divisor, upsampled by nearest repeat)"
        )
    return H // h, W // w


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-repeat a ``(B, h, w)`` mask to ``(B, H, W)`` (``h`` divides ``H``, ``w`` divides ``W``)."""
    rh, rw = size[0] // mask.shape[-2], size[1] // mask.shape[-1]
    if rh == 1 and rw == 1:
        return mask
    return mask.repeat_interleave(rh, dim=-2).repeat_interleave(rw, dim=-1)
