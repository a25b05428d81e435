"""Swin window attention on memory-efficient kernels (xformers / SDPA), a drop-in for timm's.

:class:`WindowAttention` subclasses timm's ``WindowAttention``: same constructor, parameters,
buffers and ``state_dict`` keys (``qkv``, ``proj``, ``relative_position_bias_table``, ...), same
``forward(x, mask)`` contract, plus ``backend``:

``"math"``
    timm's explicit-softmax branch, verbatim: the reference.
``"sdpa"``
    ``torch.nn.functional.scaled_dot_product_attention`` with the per-window bias broadcast over
    the batch (see "Layout").
``"xformers"``
    ``xformers.ops.memory_efficient_attention`` with the same bias, broadcast by a stride-0 batch.
``"triton"``
    :func:`simmim_fast.ops.swin_window_attention`: one Triton kernel per direction from the qkv
    projection's output, bias gathered from the table and the shift mask computed in-kernel. Inside a
    Swin block swapped by :func:`swap_window_attention` (:class:`~simmim_fast.models.swin_block.SwinBlock`)
    the block's roll, partition and reverse disappear too (:meth:`WindowAttention.forward_tokens`); called
    on windows (``forward(x, mask)``) each window is an image of one window and ``mask`` is read by the
    kernel. Registered with ``torch.library``: ``torch.compile`` keeps it in the graph.
``"auto"`` (default)
    on CUDA the Triton kernel when its capability check has no reason against the input, else
    xformers when its dispatcher accepts the input (CUDA, dtype, head dim, alignment, a kernel that
    loads for this torch), else SDPA, else math; the choice and its reasons are logged once per
    process on ``logging.getLogger("simmim_fast.attention")``. Inside ``torch.compile`` ``auto``
    uses the Triton kernel on CUDA when it can (a ``triton_op``: Inductor sees it), else SDPA: the
    xformers call is opaque to the compiler (a forced ``"xformers"`` is a graph break), while SDPA
    traces and reaches PyTorch's fused CUDA kernels -- its memory-efficient one is the kernel
    xformers' ``cutlassF-pt`` op calls.

Shapes (``N = Wh*Ww`` tokens per window, ``nW`` windows per image, ``nH`` heads, ``hd`` head dim)
    x      (nW*B, N, C)    windows of ``window_partition``: index ``b*nW + w``
    mask   (nW, N, N)      the block's shift mask (0 / -100 or -inf), or None
    out    (nW*B, N, C)

Layout. timm's SDPA branch adds the shift mask to the relative-position bias and expands the sum to
``(nW*B, nH, N, N)`` in every block. Here the bias stays ``(nW, nH, N, N)``: for a shifted block the
windows are folded into the heads, ``q/k/v (B, N, nW*nH, hd)`` (BMHK), so the bias is indexed by
head only, ``(nW*nH, N, N)``, and the batch dimension is a stride-0 ``expand`` -- one kernel launch,
no per-batch copy. An unshifted block needs no fold (``(nW*B, N, nH, hd)``, bias ``(nH, N, N)``).
The bias is allocated with its last dimension padded to a multiple of 8 (``Np``) and sliced to
``N``, so every stride is a multiple of the kernel's 16-byte alignment and no kernel re-pads it.

Bias gradient. xformers refuses a bias that requires grad unless its *shape* is the full
``(B, H, N, N)``; a stride-0 ``expand`` has that shape, so the kernel reads the small bias in the
forward (nothing of size ``B*nW*nH*N*N`` is stored) and its backward writes the per-batch bias
gradient into a transient buffer that autograd's ``expand`` backward sums over the batch -- the same
route PyTorch's own SDPA takes for a broadcast mask. (xformers' 5-D BMGHK layout, windows as groups,
was not used: its backward is unsupported in xformers 0.0.35 and its forward launches one kernel
per group.)
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock as TimmSwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

from ..ops import _common as _ops_common
from ..ops import window_attention as _fused

__all__ = [
    "BACKENDS",
    "WindowAttention",
    "swap_window_attention",
    "window_attention_reference",
    "xformers_not_supported_reasons",
    "sdpa_not_supported_reasons",
    "triton_not_supported_reasons",
    "window_attention_report",
    "BIAS_ALIGNMENT",
]

logger = logging.getLogger("simmim_fast.attention")

BACKENDS = ("auto", "triton", "xformers", "sdpa", "math")
BIAS_ALIGNMENT = 8  # last dim of bias buffers padded to this many elements (16 bytes in fp16/bf16)

NO_CUDA_REASON = "device is not CUDA (xformers has no CPU kernels)"

# Test hook: an object with ``__call__(query, key, value, attn_bias, p, scale)`` (the contract of
# ``xformers.ops.memory_efficient_attention``) and ``not_supported_reasons(query, key, value,
# attn_bias, *, p, scale, needs_grad) -> list[str]``. When set, it replaces the real xformers kernel
# and its capability check, so the whole xformers plumbing runs on CPU (tests monkeypatch it).
XFORMERS_KERNEL_OVERRIDE = None


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKENDS} (a str), got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------------------------------
# capability checks (xformers ``not_supported_reasons`` style: every reason, empty when usable)


@dataclass
class _XformersImport:
    ops: object = None  # xformers.ops.fmha, or None
    memory_efficient_attention: Optional[Callable] = None
    error: Optional[str] = None
    notes: list = field(default_factory=list)


_XFORMERS: Optional[_XformersImport] = None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _import_xformers() -> _XformersImport:
    """Import xformers once; its warnings about the native extension become notes, not stderr."""
    global _XFORMERS
    if _XFORMERS is not None:
        return _XFORMERS
    res = _XformersImport()
    xlog = logging.getLogger("xformers")
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):  # noqa: D401
            records.append(record)

    handler, old_propagate = _Keep(logging.DEBUG), xlog.propagate
    xlog.addHandler(handler)
    xlog.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import xformers.ops as xops
            from xformers.ops import fmha

        res.ops = fmha
        res.memory_efficient_attention = xops.memory_efficient_attention
    except Exception as exc:  # not installed, or broken against this torch
        res.error = f"xformers not importable: {type(exc).__name__}: {_one_line(exc)}"
    finally:
        xlog.removeHandler(handler)
        xlog.propagate = old_propagate
    try:
        from xformers import _cpp_lib

        if getattr(_cpp_lib, "_cpp_library_load_exception", None) is not None:
            res.notes.append(
                "xformers native extension not loaded (built for another torch); PyTorch's kernels "
                "are used through xformers' dispatcher (-pt ops)"
            )
    except Exception:
        pass
    _XFORMERS = res
    return res


def _dispatch_reasons(exc: BaseException) -> str:
    """xformers' 'No operator found ...' message condensed to one line (op: reason; reason | ...)."""
    ops: list[str] = []
    for line in str(exc).splitlines():
        s = line.strip()
        if s.startswith("`") and "is not supported because" in s:
            ops.append(s.split("`")[1] + ":")
        elif ops and s and not re.match(r"(query|key|value|attn_bias|p)\s+:", s):  # not the input lines
            ops[-1] += (" " if ops[-1].endswith(":") else "; ") + s
    return " | ".join(ops) if ops else _one_line(exc)


def xformers_not_supported_reasons(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    *,
    p: float = 0.0,
    scale: Optional[float] = None,
    needs_grad: bool = False,
) -> list[str]:
    """Why ``memory_efficient_attention`` cannot take these BMHK inputs (empty list: it can).

    Asks xformers' own dispatcher (forward, and backward when ``needs_grad``), so the answer is what
    would actually dispatch: device, dtype, head dim, alignment, operators that do not load for
    this torch. Never raises.
    """
    hook = XFORMERS_KERNEL_OVERRIDE
    if hook is not None:
        return list(hook.not_supported_reasons(query, key, value, attn_bias, p=p, scale=scale, needs_grad=needs_grad))
    if not _on_cuda(query):
        return [NO_CUDA_REASON]
    xf = _import_xformers()
    if xf.ops is None:
        return [xf.error or "xformers not importable"]
    reasons: list[str] = []
    try:
        fmha = xf.ops
        inp = fmha.Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale)
        try:
            inp.validate_inputs()
        except ValueError as exc:
            reasons.append(f"invalid inputs: {_one_line(exc)}")
        from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw

        try:
            _dispatch_fw(inp, needs_grad)
        except NotImplementedError as exc:
            reasons.append(f"forward: {_dispatch_reasons(exc)}")
        if needs_grad:
            try:
                try:
                    _dispatch_bw(inp, varlen_lse_packed=None)
                except TypeError:  # older xformers: _dispatch_bw(inp)
                    _dispatch_bw(inp)
            except NotImplementedError as exc:
                reasons.append(f"backward: {_dispatch_reasons(exc)}")
    except Exception as exc:  # a probe failure must not crash a forward
        reasons.append(f"xformers capability check failed: {type(exc).__name__}: {_one_line(exc)}")
    return reasons


def sdpa_not_supported_reasons() -> list[str]:
    """Why ``F.scaled_dot_product_attention`` cannot be used here (empty list: it can)."""
    if not hasattr(F, "scaled_dot_product_attention"):
        return [f"torch {torch.__version__} has no torch.nn.functional.scaled_dot_product_attention"]
    return []


def qkv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` gives for ``x`` here: the autocast dtype of x's device when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def triton_not_supported_reasons(
    attn: nn.Module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    qkv_shape: tuple[int, int, int, int],
    window_size: tuple[int, int],
    shift_size: tuple[int, int] = (0, 0),
    resolution: Optional[tuple[int, int]] = None,
    mask: Optional[torch.Tensor] = None,
) -> list[str]:
    """Why :func:`simmim_fast.ops.swin_window_attention` cannot run ``attn`` on a qkv of ``qkv_shape``
    ``(B, Hq, Wq, 3*C)`` / ``dtype`` on ``device`` (empty list: it can). Every reason: device, dtype, sizes
    (the op's own check, on a stride-0 probe: nothing allocated), attention dropout in training,
    SwinV2's cosine attention. Never raises for a timm window attention."""
    reasons: list[str] = []
    if getattr(attn, "logit_scale", None) is not None or hasattr(attn, "cpb_mlp"):
        reasons.append("cosine attention (SwinV2 logit scale / continuous position bias) is not supported")
    if attn.training and attn.attn_drop.p > 0:
        reasons.append(f"attention dropout p={attn.attn_drop.p} in training (the kernels have no dropout)")
    table = getattr(attn, "relative_position_bias_table", None)
    if table is None:
        return reasons + ["no relative_position_bias_table (not a timm Swin v1 window attention)"]
    try:
        probe = torch.empty((), device=device, dtype=dtype).expand(*qkv_shape)
        reasons += _fused.not_supported_reasons(probe, table, num_heads=attn.num_heads, window_size=window_size,
                                                shift_size=shift_size, resolution=resolution, attn_mask=mask)
    except (TypeError, ValueError) as exc:
        reasons.append(f"input: {exc}")
    return reasons


def _xformers_fw_bw_names(q, k, v, bias, p, scale, needs_grad) -> str:
    if XFORMERS_KERNEL_OVERRIDE is not None:
        return f"kernel override {type(XFORMERS_KERNEL_OVERRIDE).__name__}"
    try:
        fmha = _import_xformers().ops
        from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw

        inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias, p=p, scale=scale)
        names = [_dispatch_fw(inp, needs_grad).NAME]
        if needs_grad:
            try:
                names.append(_dispatch_bw(inp, varlen_lse_packed=None).NAME)
            except TypeError:
                names.append(_dispatch_bw(inp).NAME)
        return "ops " + " / ".join(names)
    except Exception:
        return "ops unknown"


# capability answers and decisions of ``auto`` per input signature, and the log lines already written
_REASONS: dict = {}
_DECISIONS: dict = {}
_LOGGED: set = set()


def _log_once(level: int, message: str, dedupe: str) -> None:
    if dedupe in _LOGGED:
        return
    _LOGGED.add(dedupe)
    logger.log(level, message)


def _signature(q, bias, p: float, needs_grad: bool) -> tuple:
    """What the capability answer depends on (not the batch or head count)."""
    hook = XFORMERS_KERNEL_OVERRIDE
    return (q.device.type, q.device.index, q.dtype, q.shape[1], q.shape[-1], bool(bias.requires_grad), needs_grad,
            p > 0, id(hook) if hook is not None else None)


def _cached_xformers_reasons(q, k, v, bias, p: float, scale: float, needs_grad: bool) -> tuple:
    key = _signature(q, bias, p, needs_grad)
    hit = _REASONS.get(key)
    if hit is None:
        hit = _REASONS[key] = tuple(
            xformers_not_supported_reasons(q, k, v, bias, p=p, scale=scale, needs_grad=needs_grad))
    return hit


def _auto_backend(q, k, v, bias, p: float, scale: float, needs_grad: bool) -> str:
    """The backend ``auto`` runs for these BMHK inputs; decided once per signature, logged once."""
    key = _signature(q, bias, p, needs_grad)
    hit = _DECISIONS.get(key)
    if hit is not None:
        return hit
    reasons = _cached_xformers_reasons(q, k, v, bias, p, scale, needs_grad)
    sdpa_reasons = sdpa_not_supported_reasons()
    if not reasons:
        backend = "xformers"
        detail = _xformers_fw_bw_names(q, k, v, bias, p, scale, needs_grad)
        if XFORMERS_KERNEL_OVERRIDE is None:
            detail += "".join(f"; {n}" for n in _import_xformers().notes)
    else:
        backend = "sdpa" if not sdpa_reasons else "math"
        detail = "xformers not usable: " + "; ".join(reasons)
        if sdpa_reasons:
            detail += "; sdpa not usable: " + "; ".join(sdpa_reasons)
    _DECISIONS[key] = backend
    # a CUDA input that cannot take the xformers kernel is worth a warning; CPU is expected
    level = logging.WARNING if (backend != "xformers" and q.device.type == "cuda") else logging.INFO
    _log_once(
        level,
        f"window attention: backend '{backend}' runs (requested 'auto'; {q.device.type} {str(q.dtype)[6:]}, "
        f"head dim {q.shape[-1]}; {detail})",
        dedupe=f"{backend}|{q.device.type}|{q.dtype}|{detail}",
    )
    return backend


# --------------------------------------------------------------------------------------------------
# kernels


@torch.compiler.disable
def _call_xformers(q, k, v, bias, p: float, scale: float) -> torch.Tensor:
    """``memory_efficient_attention`` (or the test hook); a graph break under ``torch.compile``."""
    hook = XFORMERS_KERNEL_OVERRIDE
    if hook is not None:
        return hook(q, k, v, bias, p, scale)
    xf = _import_xformers()
    if xf.memory_efficient_attention is None:
        raise NotImplementedError(f"window attention backend='xformers': {xf.error}")
    return xf.memory_efficient_attention(q, k, v, bias, p, scale)


def _call_sdpa(q, k, v, bias, p: float, scale: float) -> torch.Tensor:
    """SDPA on BMHK tensors; ``bias`` ``(H, N, N)`` broadcast over the batch. Returns BMHK."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.unsqueeze(0), dropout_p=p, scale=scale
    )
    return out.transpose(1, 2)


def window_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Plain attention on BMHK tensors with a per-head bias broadcast over the batch.

    q, k, v ``(B, N, H, hd)``; bias ``(H, N, N)``; returns ``(B, N, H, hd)``.

    Equivalent PyTorch: ``softmax(q @ k^T * scale + bias) @ v`` per (batch, head).
    """
    attn = (q.transpose(1, 2) * scale) @ k.permute(0, 2, 3, 1)
    attn = (attn + bias.unsqueeze(0)).softmax(dim=-1)
    return (attn @ v.transpose(1, 2)).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# the module


class WindowAttention(TimmWindowAttention):
    """timm ``WindowAttention`` with a ``backend``: ``"auto" | "xformers" | "sdpa" | "math"``.

    x ``(nW*B, N, C)``, mask ``(nW, N, N)`` or None -> ``(nW*B, N, C)``.

    Equivalent PyTorch: timm's ``WindowAttention.forward`` with ``fused_attn=False`` (``backend="math"``
    runs exactly that code). Constructor arguments are timm's plus the keyword ``backend``.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    @classmethod
    def from_timm(cls, attn: TimmWindowAttention, *, backend: str = "auto") -> "WindowAttention":
        """A new module sharing ``attn``'s parameters, buffers, submodules and hooks (no copy)."""
        if not isinstance(attn, TimmWindowAttention):
            raise TypeError(f"attn: expected a timm WindowAttention, got {type(attn).__name__}")
        backend = _check_backend(backend)
        new = cls.__new__(cls)
        for name, value in attn.__dict__.items():  # containers copied, tensors/modules shared
            new.__dict__[name] = value.copy() if isinstance(value, (dict, set)) else value
        new.backend = backend
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, backend={self.backend!r}"

    # ---------------------------------------------------------------- pieces

    def _check_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> int:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        N = self.window_area
        if x.ndim != 3 or x.shape[1] != N or x.shape[2] != self.dim:
            raise ValueError(f"x: expected (num_windows*B, {N}, {self.dim}) (window tokens, dim), got {tuple(x.shape)}")
        if mask is None:
            return 1
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
        if not mask.is_floating_point():
            raise TypeError(f"mask: expected a floating additive mask (0 / -100 or -inf), got {mask.dtype}")
        if mask.ndim != 3 or mask.shape[1] != N or mask.shape[2] != N or mask.shape[0] < 1:
            raise ValueError(f"mask: expected (num_windows, {N}, {N}), got {tuple(mask.shape)}")
        if x.shape[0] % mask.shape[0] != 0:
            raise ValueError(
                f"mask: {mask.shape[0]} windows do not divide x.shape[0] = {x.shape[0]} (expected num_windows*B)"
            )
        return mask.shape[0]

    def _dims(self) -> tuple[int, int]:
        attn_dim = self.qkv.weight.shape[0] // 3
        return attn_dim, attn_dim // self.num_heads

    def _project_qkv(self, x: torch.Tensor, groups: int):
        """q, k, v in BMHK ``(B, N, groups*nH, hd)`` with ``B = x.shape[0] // groups``."""
        B_, N, C = x.shape
        nH = self.num_heads
        attn_dim, hd = self._dims()
        if groups == 1:
            return self.qkv(x).view(B_, N, 3, nH, hd).unbind(2)  # strided views, no copy
        B = B_ // groups
        xt = x.view(B, groups, N, C).transpose(1, 2).contiguous()  # (B, N, nW, C): one copy of x
        lin = self.qkv
        if type(lin) is nn.Linear and not (lin._forward_hooks or lin._forward_pre_hooks):
            # three GEMMs give q, k, v each contiguous as (B, N, nW, nH*hd): the fold is a view
            ws = lin.weight.chunk(3, dim=0)
            bs = lin.bias.chunk(3, dim=0) if lin.bias is not None else (None, None, None)
            return tuple(F.linear(xt, w, b).view(B, N, groups * nH, hd) for w, b in zip(ws, bs))
        qkv = lin(xt).view(B, N, groups, 3, nH, hd).permute(3, 0, 1, 2, 4, 5)  # a replaced qkv module
        return qkv.reshape(3, B, N, groups * nH, hd).unbind(0)

    def _window_bias(self, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Relative-position bias (+ shift mask) ``(G, N, N)``, G = nW*nH or nH, last dim padded to ``Np``.

        The storage is ``(G, N, Np)`` with ``Np`` a multiple of :data:`BIAS_ALIGNMENT`; the result
        is its ``[..., :N]`` slice. Differentiable in ``relative_position_bias_table``.
        """
        N, nH = self.window_area, self.num_heads
        Np = _round_up(N, BIAS_ALIGNMENT)
        index = F.pad(self.relative_position_index, (0, Np - N))  # (N, Np); padding reads entry 0, unused
        table = self.relative_position_bias_table  # (T, nH)
        # gather rows, then permute: the table's gradient (index_add into (T, nH)) comes out contiguous, as
        # DDP's gradient buckets expect (a gather on ``table.t()`` gave it transposed strides: a copy per step)
        bias = table.index_select(0, index.reshape(-1)).view(N, Np, nH).permute(2, 0, 1).contiguous()
        if mask is not None:
            m = F.pad(mask.to(bias.dtype), (0, Np - N))  # (nW, N, Np)
            bias = bias.unsqueeze(0) + m.unsqueeze(1)  # (nW, nH, N, Np), window-major like the fold
        return bias.to(dtype).reshape(-1, N, Np)[..., :N]

    def _merge(self, out: torch.Tensor, groups: int) -> torch.Tensor:
        """BMHK ``(B, N, groups*nH, hd)`` -> ``(groups*B, N, C)`` through ``proj``."""
        B, N = out.shape[:2]
        if groups == 1:
            out = out.reshape(B, N, -1)
        else:
            out = out.reshape(B, N, groups, -1).transpose(1, 2).reshape(B * groups, N, -1)
        return self.proj_drop(self.proj(out))

    def _forward_math(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """timm's explicit-softmax branch (``fused_attn=False``), unchanged."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    # ---------------------------------------------------------------- forward

    def _triton_reasons(self, x, qkv_shape, window_size, shift_size, resolution, mask) -> tuple:
        """:func:`triton_not_supported_reasons` for this call, cached per signature outside ``torch.compile``."""
        table = self.relative_position_bias_table
        dtype = qkv_dtype(x)
        key = None
        if not torch.compiler.is_compiling():
            mask_sig = None if mask is None else (mask.device, mask.dtype, tuple(mask.shape), mask.stride(),
                                                  bool(mask.requires_grad))
            key = ("triton", x.device, dtype, tuple(qkv_shape), tuple(window_size), tuple(shift_size),
                   None if resolution is None else tuple(resolution), mask_sig, table.device, table.dtype,
                   tuple(table.shape), self.num_heads, self.training and self.attn_drop.p > 0,
                   getattr(self, "logit_scale", None) is not None)
            hit = _REASONS.get(key)
            if hit is not None:
                return hit
        reasons = tuple(triton_not_supported_reasons(self, device=x.device, dtype=dtype, qkv_shape=qkv_shape,
                                                     window_size=window_size, shift_size=shift_size,
                                                     resolution=resolution, mask=mask))
        if key is not None:
            _REASONS[key] = reasons
        return reasons

    def uses_triton(self, x: torch.Tensor, *, qkv_shape: tuple[int, int, int, int], window_size: tuple[int, int],
                    shift_size: tuple[int, int] = (0, 0), resolution: Optional[tuple[int, int]] = None,
                    mask: Optional[torch.Tensor] = None) -> bool:
        """Whether this call runs the Triton kernel: always for ``backend="triton"`` (raising
        ``NotImplementedError`` with every reason when it cannot), for ``"auto"`` on CUDA (not
        interpreted) when there is no reason against it; the decision of ``auto`` is logged once."""
        backend = self.backend
        if backend not in ("triton", "auto"):
            return False
        if backend == "auto" and (x.device.type != "cuda" or _ops_common.INTERPRET):
            return False
        reasons = self._triton_reasons(x, qkv_shape, window_size, shift_size, resolution, mask)
        if backend == "triton":
            if reasons:
                raise NotImplementedError("window attention backend='triton' cannot run this input: "
                                          + "; ".join(reasons) + " (backend='auto' falls back to xformers/SDPA)")
            return True
        if not torch.compiler.is_compiling():  # a log call would break the graph
            where = "block" if resolution is not None else "windows"
            key = ("triton", x.device.type, qkv_dtype(x), window_size, bool(any(shift_size)), where, bool(reasons))
            if reasons:
                _log_once(logging.WARNING, "window attention: auto does not use the Triton kernel on "
                          f"{x.device.type} ({'; '.join(reasons)}); trying xformers / SDPA",
                          dedupe=f"triton-no|{'; '.join(reasons)}")
            else:
                _DECISIONS[key] = "triton"
                _log_once(logging.INFO, f"window attention: backend 'triton' runs (requested 'auto'; {x.device.type} "
                          f"{str(qkv_dtype(x))[6:]}, window {window_size}, head dim {self._dims()[1]}, "
                          f"{'fused block (no roll/partition copies)' if where == 'block' else 'on windows'})",
                          dedupe=f"triton|{x.device.type}|{qkv_dtype(x)}|{where}")
        return not reasons

    def forward_tokens(self, x: torch.Tensor, window_size: tuple[int, int], shift_size: tuple[int, int]) -> torch.Tensor:
        """A Swin block's whole attention path on tokens, with the Triton kernel.

        x ``(B, H, W, C)`` (after ``norm1``) -> ``(B, H, W, C)`` (after ``proj``): what timm's
        ``SwinTransformerBlock._attn`` returns, without its roll, partition, reverse and reverse roll.
        When H or W is not a multiple of the window the tokens are zero-padded before ``qkv`` (as timm
        pads after the roll: padded tokens project to ``qkv.bias``).

        Equivalent PyTorch: ``SwinTransformerBlock._attn(x)`` with this module's ``"math"`` backend.
        """
        B, H, W, _ = x.shape
        wh, ww = window_size
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        qkv = self.qkv(x)  # (B, Hp, Wp, 3*attn_dim)
        out = _fused.swin_window_attention(qkv, self.relative_position_bias_table, num_heads=self.num_heads,
                                           window_size=(wh, ww), shift_size=tuple(shift_size), resolution=(H, W),
                                           scale=float(self.scale), backend="triton")
        return self.proj_drop(self.proj(out))

    def _forward_triton(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Windows ``(nW*B, N, C)`` as images of one window each; ``mask`` read by the kernel."""
        B_, N, _ = x.shape
        wh, ww = self.window_size
        qkv = self.qkv(x).view(B_, wh, ww, -1)
        out = _fused.swin_window_attention(qkv, self.relative_position_bias_table, num_heads=self.num_heads,
                                           window_size=(wh, ww), scale=float(self.scale), attn_mask=mask,
                                           backend="triton")
        return self.proj_drop(self.proj(out.reshape(B_, N, -1)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``(nW*B, N, C)``, mask ``(nW, N, N)`` (0 / -100) or None -> ``(nW*B, N, C)``."""
        groups = self._check_inputs(x, mask)
        backend = self.backend
        if backend == "math":
            return self._forward_math(x, mask)
        wh, ww = self.window_size
        if self.uses_triton(x, qkv_shape=(x.shape[0], wh, ww, self.qkv.weight.shape[0]), window_size=(wh, ww),
                            mask=mask):
            return self._forward_triton(x, mask)
        if backend == "sdpa" and sdpa_not_supported_reasons():
            raise NotImplementedError("window attention backend='sdpa': " + "; ".join(sdpa_not_supported_reasons()))
        q, k, v = self._project_qkv(x, groups)
        bias = self._window_bias(mask, q.dtype)  # (groups*nH, N, N), padded storage
        p = self.attn_drop.p if self.training else 0.0
        scale = float(self.scale)
        if backend != "sdpa":
            # xformers wants the bias at the full (B, H, N, N) shape: a stride-0 view, never materialised
            bias_b = bias.unsqueeze(0).expand(q.shape[0], -1, -1, -1)
            if backend == "auto":
                if torch.compiler.is_compiling():
                    backend = "sdpa"
                else:
                    needs_grad = torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
                    backend = _auto_backend(q, k, v, bias_b, p, scale, needs_grad)
                    if backend == "math":
                        return self._forward_math(x, mask)
            elif not torch.compiler.is_compiling():  # forced: fail loudly, listing every reason
                needs_grad = torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
                reasons = _cached_xformers_reasons(q, k, v, bias_b, p, scale, needs_grad)
                if reasons:
                    raise NotImplementedError(
                        "window attention backend='xformers' cannot run this input: " + "; ".join(reasons)
                        + " (backend='auto' falls back to SDPA)"
                    )
        if backend == "xformers":
            out = _call_xformers(q, k, v, bias_b, p, scale)
        else:
            out = _call_sdpa(q, k, v, bias, p, scale)
        return self._merge(out, groups)


# --------------------------------------------------------------------------------------------------
# swapping into timm models


def _iter_window_attention(model: nn.Module) -> Iterable[tuple[nn.Module, str, TimmWindowAttention]]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, TimmWindowAttention):
                yield parent, name, child


def swap_window_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every timm ``WindowAttention`` of ``model`` by :class:`WindowAttention`.

    Parameters, buffers, submodules and hooks are shared with the replaced modules (no copy), so
    ``state_dict`` keys and values, optimizer references and outputs are unchanged (up to the
    backend's rounding). Modules that are already ours get the new ``backend``. Every block that is
    exactly timm's ``SwinTransformerBlock`` becomes a :class:`~simmim_fast.models.swin_block.SwinBlock`
    (same object, same state; its ``_attn`` runs :meth:`WindowAttention.forward_tokens` when the
    backend resolves to ``"triton"``, else timm's code). Returns ``model``.
    Raises ``ValueError`` if ``model`` has no window attention (not a Swin), or for a bad ``backend``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm SwinTransformer), got {type(model).__name__}")
    backend = _check_backend(backend)
    found = list(_iter_window_attention(model))
    if not found:
        raise ValueError(
            f"model: no timm.models.swin_transformer.WindowAttention found in {type(model).__name__} "
            "(expected a timm SwinTransformer or simmim_fast's Swin encoder)"
        )
    for parent, name, child in found:
        if isinstance(child, WindowAttention):
            child.backend = backend
        else:
            setattr(parent, name, WindowAttention.from_timm(child, backend=backend))
    from .swin_block import SwinBlock  # imports this module

    for block in model.modules():
        if type(block) is TimmSwinTransformerBlock:
            block.__class__ = SwinBlock  # adds no state: only the attention path's dispatch (``_attn``)
    return model


# --------------------------------------------------------------------------------------------------
# report (``python -m simmim_fast.info``)


def window_attention_report() -> dict:
    """Which backend ``auto`` picks on this machine for a Swin-B-like training input, and why.

    Probes a small shifted-window input (4 windows of 6x6 tokens, 4 heads of 32) with a bias that
    requires grad: on CUDA in bf16 (fp16 if bf16 is unsupported), else on CPU in fp32 (the Triton
    kernel's check on the same geometry as a shifted block; nothing is launched).
    """
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dev, dtype = torch.device("cpu"), torch.float32
    N, Np, G, hd, B = 36, _round_up(36, BIAS_ALIGNMENT), 16, 32, 2
    q = torch.randn(B, N, G, hd, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    small = torch.zeros(G, N, Np, device=dev, dtype=dtype, requires_grad=True)
    bias = small[..., :N].unsqueeze(0).expand(B, -1, -1, -1)
    reasons = xformers_not_supported_reasons(q, k, v, bias, scale=hd**-0.5, needs_grad=True)
    sdpa_reasons = sdpa_not_supported_reasons()
    probe_attn = TimmWindowAttention(G // 4 * hd, num_heads=G // 4, window_size=6).to(dev).train()
    triton_reasons = triton_not_supported_reasons(probe_attn, device=dev, dtype=dtype, qkv_shape=(B, 12, 12, 3 * G // 4 * hd),
                                                  window_size=(6, 6), shift_size=(3, 3), resolution=(12, 12))
    if dev.type != "cuda" and not any("not CUDA" in r for r in triton_reasons):
        triton_reasons = ["device is not CUDA (auto runs the Triton kernel on CUDA only; TRITON_INTERPRET=1 lets a "
                          "forced backend='triton' run on CPU)"] + triton_reasons
    if not triton_reasons and not _ops_common.INTERPRET:
        auto = "triton"
    else:
        auto = "xformers" if not reasons else ("sdpa" if not sdpa_reasons else "math")
    notes = [f"probe: {dev.type} {str(dtype)[6:]}, BMHK (B={B}, N={N}, H={G}, hd={hd}), bias requires grad; "
             f"triton: a shifted Swin block of 12x12 tokens, window 6, {G // 4} heads of {hd}"]
    if auto == "xformers":
        notes.append(_xformers_fw_bw_names(q, k, v, bias, 0.0, hd**-0.5, True))
    if dev.type == "cuda" or _XFORMERS is not None:
        notes.extend(_import_xformers().notes)
    notes.append("inside torch.compile, auto uses triton when it can (CUDA), else sdpa")
    return {
        "auto": auto,
        "triton_reasons": triton_reasons,
        "xformers_reasons": reasons,
        "sdpa_reasons": sdpa_reasons,
        "notes": notes,
    }
