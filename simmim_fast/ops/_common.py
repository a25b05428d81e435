"""Shared plumbing of the public ops: Triton availability, backend choice, argument checks, mask upsampling.

Every op takes ``backend="auto" | "triton" | "reference"``. ``auto`` picks Triton only for CUDA
tensors (outside the interpreter) when the op's capability check returns no reasons, else the
reference. Forcing ``triton`` on an input it cannot take raises ``NotImplementedError`` listing every
reason (in the style of xformers' ``ops/fmha``). With ``TRITON_INTERPRET=1`` set before this package
is imported, a forced ``triton`` runs the kernels on CPU tensors through Triton's interpreter (how the
CPU CI checks them); ``auto`` still takes the reference on CPU.

Importing this module never fails because of Triton: a missing or broken install becomes a
capability reason (``TRITON_IMPORT_ERROR``), logged once when ``auto`` falls back on CUDA tensors.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger("simmim_fast.ops")

BACKENDS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT32_LIMIT = 2**31 - 1

try:  # optional: every op keeps its reference when Triton cannot be imported
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(x_ptr):  # its type tells whether @triton.jit built interpreted kernels
        pass

    TRITON_IMPORT_ERROR: str | None = None
    #: True when this process' kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
    INTERPRET = type(_probe_kernel).__name__ == "InterpretedFunction"
except Exception as exc:  # ImportError, or a broken install raising anything at import
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    INTERPRET = False

HAS_TRITON = TRITON_IMPORT_ERROR is None

if HAS_TRITON:
    _INTERPRETED = tl.constexpr(INTERPRET)

    @triton.jit
    def cast_to(x, dtype: tl.constexpr):
        """Round float32 ``x`` to ``dtype`` to nearest even, as compiled kernels and torch do.

        Triton's interpreter truncates float32 -> bfloat16 (and its "rtne" option rounds ties up), so
        under the interpreter the rounding is done on the bits; compiled kernels use the hardware cast.
        """
        if _INTERPRETED and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
        return y

#: Tests set this to True to allocate every kernel output filled with NaN, so an element a kernel
#: forgets to write shows up as NaN instead of as whatever the allocator returned.
POISON_OUTPUTS = False


def triton_interpret_mode() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1`` at import)."""
    return INTERPRET


def triton_reasons() -> list[str]:
    """Reasons why no Triton kernel can run in this process (empty: Triton is importable)."""
    if TRITON_IMPORT_ERROR is not None:
        return [f"triton is not importable ({TRITON_IMPORT_ERROR})"]
    return []


def device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Reasons why Triton cannot run on these tensors' devices (empty list: it can)."""
    reasons = triton_reasons()
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on different devices: {sorted(str(d) for d in devices)}")
    for d in sorted(devices, key=str):
        if d.type == "cuda":
            continue
        if d.type == "cpu" and INTERPRET:
            continue
        reasons.append(
            f"device {d} is not CUDA (Triton runs on CPU only with TRITON_INTERPRET=1 set before import)"
        )
    return reasons


def size_reasons(**tensors: torch.Tensor) -> list[str]:
    """Reasons for tensors too large for the kernels' int32 index arithmetic."""
    reasons = []
    for name, t in tensors.items():
        if t is None:
            continue
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        if span > INT32_LIMIT:
            reasons.append(f"{name} spans {span} elements, more than the kernels' int32 indexing allows ({INT32_LIMIT})")
    return reasons


_fallback_logged: set[str] = set()


def resolve_backend(op: str, backend: str, reasons: Sequence[str], *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for ``backend`` given the capability ``reasons``.

    ``auto`` picks Triton only when every tensor in ``tensors`` is a CUDA tensor, the kernels are not
    interpreted, and there is no reason against it; on CUDA tensors a fallback is logged once per op.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if reasons:
            raise NotImplementedError(f"{op}: backend='triton' cannot take this input: " + "; ".join(reasons))
        return "triton"
    on_cuda = bool(tensors) and all(t.device.type == "cuda" for t in tensors)
    if not on_cuda or INTERPRET:
        return "reference"
    if reasons:
        if op not in _fallback_logged:
            _fallback_logged.add(op)
            log.warning("simmim_fast.ops.%s: using the PyTorch reference on CUDA: %s", op, "; ".join(reasons))
        return "reference"
    return "triton"


def use_traceable(*tensors: torch.Tensor) -> bool:
    """Which ``torch.library`` registration runs the kernels: the ``triton_op`` one (Inductor sees the
    kernels) for CUDA tensors with compiled kernels, else the opaque ``custom_op`` one (interpreter)."""
    return HAS_TRITON and not INTERPRET and all(t.device.type == "cuda" for t in tensors)


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised kernel output (NaN-filled when ``POISON_OUTPUTS`` is set by the tests)."""
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as kernels read it: bool reinterpreted as uint8 (no copy), other dtypes as they are."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


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


def check_same_batch(**tensors: torch.Tensor) -> None:
    """Tensors that must share their batch size: a mismatch names the one that disagrees with the others."""
    sizes = {name: t.shape[0] for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(set(sizes.values())) <= 1:
        return
    counts = list(sizes.values())
    odd = [name for name, b in sizes.items() if counts.count(b) == 1]
    name = odd[0] if len(odd) == 1 else next(iter(sizes))
    others = ", ".join(f"{k} {v}" for k, v in sizes.items() if k != name)
    raise ValueError(f"{name}: batch {sizes[name]} differs from the others' ({others})")


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
