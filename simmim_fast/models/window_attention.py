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
``"auto"`` (default)
    xformers when its dispatcher accepts the input (CUDA, dtype, head dim, alignment, a kernel that
    loads for this torch), else SDPA, else math; the choice and its reasons are logged once per
    process on ``logging.getLogger("simmim_fast.attention")``. Inside ``torch.compile`` ``auto``
    uses SDPA: the xformers call is opaque to the compiler (a forced ``"xformers"`` is a graph
    break), while SDPA traces and reaches PyTorch's fused CUDA kernels -- its memory-efficient one
    is the kernel xformers' ``cutlassF-pt`` op calls.

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
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

__all__ = [
    "BACKENDS",
    "WindowAttention",
    "swap_window_attention",
    "window_attention_reference",
    "xformers_not_supported_reasons",
    "sdpa_not_supported_reasons",
    "window_attention_report",
    "BIAS_ALIGNMENT",
]

logger = logging.getLogger("simmim_fast.attention")

BACKENDS = ("auto", "xformers", "sdpa", "math")
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

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``(nW*B, N, C)``, mask ``(nW, N, N)`` (0 / -100) or None -> ``(nW*B, N, C)``."""
        groups = self._check_inputs(x, mask)
        backend = self.backend
        if backend == "math":
            return self._forward_math(x, mask)
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
    backend's rounding). Modules that are already ours get the new ``backend``. Returns ``model``.
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
    return model


# --------------------------------------------------------------------------------------------------
# report (``python -m simmim_fast.info``)


def window_attention_report() -> dict:
    """Which backend ``auto`` picks on this machine for a Swin-B-like training input, and why.

    Probes a small shifted-window input (4 windows of 6x6 tokens, 4 heads of 32) with a bias that
    requires grad: on CUDA in bf16 (fp16 if bf16 is unsupported), else on CPU in fp32.
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
    auto = "xformers" if not reasons else ("sdpa" if not sdpa_reasons else "math")
    notes = [f"probe: {dev.type} {str(dtype)[6:]}, BMHK (B={B}, N={N}, H={G}, hd={hd}), bias requires grad"]
    if auto == "xformers":
        notes.append(_xformers_fw_bw_names(q, k, v, bias, 0.0, hd**-0.5, True))
    if dev.type == "cuda" or _XFORMERS is not None:
        notes.extend(_import_xformers().notes)
    notes.append("inside torch.compile, auto uses sdpa")
    return {
        "auto": auto,
        "xformers_reasons": reasons,
        "sdpa_reasons": sdpa_reasons,
        "notes": notes,
    }
