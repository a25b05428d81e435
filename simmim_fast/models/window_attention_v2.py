"""SwinV2 window attention (scaled cosine attention, log-spaced CPB bias) on SDPA, a drop-in for timm's.

:class:`WindowAttentionV2` subclasses timm's ``timm.models.swin_transformer_v2.WindowAttention``: same
constructor, parameters (``qkv``, ``q_bias``, ``v_bias``, ``logit_scale``, ``cpb_mlp``, ``proj``),
buffers (``k_bias``, ``relative_coords_table``, ``relative_position_index``, all non-persistent) and
``state_dict`` keys, same ``forward(x, mask)`` contract, plus ``backend``:

``"math"``
    timm's ``forward``, called as it is: the reference twin.
``"sdpa"``
    ``torch.nn.functional.scaled_dot_product_attention`` on the same numbers, rearranged:
    ``cos(q, k) * s_h + B`` with ``s_h = exp(min(logit_scale_h, log 100))`` is
    ``(normalize(q) * s_h) . normalize(k) + B``, so q is normalised and multiplied by its head's
    scale before the call, k normalised, and SDPA runs with ``scale=1``; the bias
    ``B = 16 * sigmoid(cpb_mlp(relative_coords_table))`` gathered by ``relative_position_index``
    (+ the shift mask) is the ``attn_mask``, broadcast over the batch (see "Layout").
``"xformers"``, ``"triton"``
    Refused (``NotImplementedError`` at construction, naming the reason): xformers'
    ``memory_efficient_attention`` would take the pre-scaled q, but its path is not wired for
    SwinV2 here yet, and the fused Triton window-attention kernel (``ops.window_attention``) computes
    ``q . k * hd**-0.5`` plus a table bias only. See :func:`not_supported_reasons`.
``"auto"`` (default)
    SDPA (math where this torch has no SDPA); the choice and the reason the other kernels are not
    used are logged once per process on ``logging.getLogger("simmim_fast.attention")``.

Shapes (``N = Wh*Ww`` tokens per window, ``nW`` windows per image, ``nH`` heads, ``hd`` head dim)
    x      (nW*B, N, C)    windows of ``window_partition``: index ``b*nW + w``
    mask   (nW, N, N)      the block's shift mask (0 / -100), or None
    out    (nW*B, N, C)

Layout (as the Swin V1 :class:`~simmim_fast.models.window_attention.WindowAttention`). The bias stays
``(nH, N, N)`` for an unshifted block and ``(nW*nH, N, N)`` for a shifted one, whose windows are folded
into the heads (q/k/v ``(B, N, nW*nH, hd)``, head index ``w*nH + h``, three GEMMs so that the fold is a
view); the batch is a broadcast of ``attn_mask``, never an expanded copy. The CPB sigmoid is taken on
the ``((2Wh-1)(2Ww-1), nH)`` table before the gather (elementwise, so the same numbers as timm's
sigmoid after it). The bias is allocated with its last dimension padded to a multiple of
``BIAS_ALIGNMENT`` and sliced to ``N`` (16-byte aligned strides for the CUDA kernels).

Equivalent PyTorch: timm's ``swin_transformer_v2.WindowAttention.forward`` (``backend="math"``).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttentionV2

from .window_attention import BIAS_ALIGNMENT, sdpa_not_supported_reasons

__all__ = [
    "BACKENDS",
    "TOLERANCES",
    "WindowAttentionV2",
    "swap_window_attention_v2",
    "not_supported_reasons",
    "LOGIT_SCALE_MAX",
    "CPB_SCALE",
]

logger = logging.getLogger("simmim_fast.attention")

BACKENDS = ("auto", "triton", "xformers", "sdpa", "math")
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # official/timm clamp of logit_scale before exp (scale <= 100)
CPB_SCALE = 16.0  # bias = 16 * sigmoid(cpb_mlp(...))

#: ``sdpa`` against ``math`` (timm's forward), outputs and every gradient, as ``assert_close`` keywords with
#: ``atol`` relative to the largest magnitude of the reference tensor (``atol * max|ref|``). fp32: SDPA's CPU
#: kernel sums in another order than timm's matmuls and the cosine scale reaches 100 (measured worst in
#: tests/test_swinv2.py: 4e-6 of the max); fp64: the same comparison holds to ~2e-14 of the max (the plumbing is
#: exact). bf16: both paths against the fp64 reference of the same (bf16-rounded) weights, ``atol`` relative to
#: the max and ``mean`` the mean |error| relative to the mean |ref| -- logits of up to 100 rounded to bf16 move
#: the softmax a lot (measured: timm's math path 10% of the max worst, 2% mean; sdpa 5-8%, 1.3%).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=0.0, atol=0.15, mean=0.03),
}

_TRITON_REASON = ("the fused Triton window-attention kernel (ops.window_attention) computes q.k * hd**-0.5 plus a "
                  "relative-position table bias; SwinV2's cosine attention (normalised q/k, per-head clamped logit "
                  "scale, 16*sigmoid(CPB-MLP) bias) is not supported by it yet")
_XFORMERS_REASON = ("xformers is not wired for SwinV2's cosine attention yet (normalised q/k, per-head clamped logit "
                    "scale, 16*sigmoid(CPB-MLP) bias); on these stacks it reaches the same kernels as SDPA")


def _check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKENDS} (a str), got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def not_supported_reasons(backend: str) -> list[str]:
    """Why SwinV2 window attention cannot run on ``backend`` (empty list: it can). Never raises for a known name.

    ``"triton"`` and ``"xformers"``: cosine attention is not supported by those paths yet; ``"sdpa"``: this
    torch has no ``scaled_dot_product_attention``; ``"math"`` and ``"auto"``: always usable.
    """
    backend = _check_backend(backend)
    if backend == "triton":
        return [_TRITON_REASON]
    if backend == "xformers":
        return [_XFORMERS_REASON]
    if backend == "sdpa":
        return sdpa_not_supported_reasons()
    return []


def _refuse_unsupported(backend: str) -> str:
    backend = _check_backend(backend)
    if backend in ("triton", "xformers"):
        raise NotImplementedError(
            f"backend={backend!r}: " + "; ".join(not_supported_reasons(backend)) + " (use 'auto' or 'sdpa')"
        )
    return backend


_LOGGED: set = set()


def _auto_backend(device: torch.device) -> str:
    reasons = sdpa_not_supported_reasons()
    backend = "math" if reasons else "sdpa"
    key = (backend, device.type)
    if key not in _LOGGED:
        _LOGGED.add(key)
        detail = "cosine attention: xformers / Triton kernels not used (not supported yet)"
        if reasons:
            detail += "; sdpa not usable: " + "; ".join(reasons)
        logger.info("window attention (SwinV2): backend '%s' runs (requested 'auto'; %s; %s)", backend, device.type, detail)
    return backend


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class WindowAttentionV2(TimmWindowAttentionV2):
    """timm SwinV2 ``WindowAttention`` with a ``backend``: ``"auto" | "sdpa" | "math"`` (see the module doc).

    x ``(nW*B, N, C)``, mask ``(nW, N, N)`` or None -> ``(nW*B, N, C)``.

    Equivalent PyTorch: ``timm.models.swin_transformer_v2.WindowAttention.forward`` (``backend="math"`` calls
    it). Constructor arguments are timm's plus the keyword ``backend``.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        backend = _refuse_unsupported(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    @classmethod
    def from_timm(cls, attn: TimmWindowAttentionV2, *, backend: str = "auto") -> "WindowAttentionV2":
        """A new module sharing ``attn``'s parameters, buffers, submodules and hooks (no copy)."""
        if not isinstance(attn, TimmWindowAttentionV2):
            raise TypeError(f"attn: expected a timm swin_transformer_v2.WindowAttention, got {type(attn).__name__}")
        backend = _refuse_unsupported(backend)
        new = cls.__new__(cls)
        for name, value in attn.__dict__.items():  # containers copied, tensors/modules shared
            new.__dict__[name] = value.copy() if isinstance(value, (dict, set)) else value
        new.backend = backend
        return new

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, pretrained_window_size={self.pretrained_window_size}, "
                f"num_heads={self.num_heads}, backend={self.backend!r}")

    # ---------------------------------------------------------------- pieces

    @property
    def window_area(self) -> int:
        return int(self.window_size[0]) * int(self.window_size[1])

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
                f"mask: {mask.shape[0]} windows do not divide x.shape[0] = {x.shape[0]} (expected num_windows*B)")
        return mask.shape[0]

    def head_scales(self) -> torch.Tensor:
        """``(nH,)``: ``exp(min(logit_scale, log 100))``, each head's cosine-similarity multiplier."""
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp().reshape(-1)

    def _project(self, x: torch.Tensor, groups: int):
        """q, k, v in BMHK ``(B, N, groups*nH, hd)`` with ``B = x.shape[0] // groups``."""
        B_, N, C = x.shape
        nH = self.num_heads
        hd = C // nH
        w = self.qkv.weight
        if self.q_bias is not None:
            k_bias = getattr(self, "k_bias", None)  # a zero buffer in timm >= 1.0 (older: zeros made in forward)
            biases = (self.q_bias, torch.zeros_like(self.v_bias) if k_bias is None else k_bias, self.v_bias)
        else:
            biases = (None, None, None)
        separate = getattr(self, "qkv_bias_separate", False)
        if groups > 1:
            # (B, N, nW, C): one copy of x, then each GEMM writes q / k / v already folded
            x = x.view(B_ // groups, groups, N, C).transpose(1, 2).contiguous()
        B = x.shape[0]
        out = []
        for wi, bi in zip(w.chunk(3, dim=0), biases):
            if separate and bi is not None:
                t = F.linear(x, wi) + bi
            else:
                t = F.linear(x, wi, bi)
            out.append(t.reshape(B, N, groups * nH, hd))
        return out

    def _window_bias(self, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``16*sigmoid(CPB)`` (+ shift mask) ``(G, N, N)``, G = nW*nH or nH, storage padded to ``(G, N, Np)``."""
        N, nH = self.window_area, self.num_heads
        Np = _round_up(N, BIAS_ALIGNMENT)
        table = CPB_SCALE * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, nH))  # (T, nH)
        index = F.pad(self.relative_position_index, (0, Np - N))  # (N, Np); padding reads entry 0, unused
        bias = table.index_select(0, index.reshape(-1)).view(N, Np, nH).permute(2, 0, 1).contiguous()
        if mask is not None:
            m = F.pad(mask.to(bias.dtype), (0, Np - N))  # (nW, N, Np)
            bias = bias.unsqueeze(0) + m.unsqueeze(1)  # (nW, nH, N, Np), window-major like the fold
        return bias.to(dtype).reshape(-1, N, Np)[..., :N]

    def _forward_sdpa(self, x: torch.Tensor, mask: Optional[torch.Tensor], groups: int) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self._project(x, groups)  # (B, N, G, hd)
        B, G = q.shape[0], q.shape[2]
        scale = self.head_scales().to(q.dtype)  # (nH,)
        if groups > 1:
            scale = scale.repeat(groups)  # head index w*nH + h -> scale[h]
        dt = v.dtype  # one dtype for the kernel (autocast may run the normalisation in fp32)
        q = (F.normalize(q, dim=-1) * scale.view(1, 1, G, 1)).to(dt)
        k = F.normalize(k, dim=-1).to(dt)
        bias = self._window_bias(mask, dt)  # (G, N, N)
        p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.unsqueeze(0), dropout_p=p,
            scale=1.0,
        )  # (B, G, N, hd)
        out = out.transpose(1, 2)  # (B, N, G, hd)
        if groups == 1:
            out = out.reshape(B, N, C)
        else:
            out = out.reshape(B, N, groups, C).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``(nW*B, N, C)``, mask ``(nW, N, N)`` (0 / -100) or None -> ``(nW*B, N, C)``."""
        groups = self._check_inputs(x, mask)
        backend = self.backend
        if backend == "auto":
            backend = "sdpa" if torch.compiler.is_compiling() else _auto_backend(x.device)
        elif backend == "sdpa":
            reasons = sdpa_not_supported_reasons()
            if reasons:
                raise NotImplementedError("window attention (SwinV2) backend='sdpa': " + "; ".join(reasons))
        if backend == "math":
            return super().forward(x, mask)
        return self._forward_sdpa(x, mask, groups)


# --------------------------------------------------------------------------------------------------
# swapping into timm models


def _iter_window_attention_v2(model: nn.Module) -> Iterable[tuple[nn.Module, str, TimmWindowAttentionV2]]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, TimmWindowAttentionV2):
                yield parent, name, child


def swap_window_attention_v2(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every timm SwinV2 ``WindowAttention`` of ``model`` by :class:`WindowAttentionV2`.

    The contract of :func:`~simmim_fast.models.window_attention.swap_window_attention`: parameters, buffers,
    submodules and hooks are shared with the replaced modules (no copy), so ``state_dict`` keys and values and
    optimizer references are unchanged; modules that are already ours get the new ``backend``. Returns
    ``model``. Raises ``ValueError`` if ``model`` has no SwinV2 window attention, ``ValueError``/``TypeError``
    for a bad ``backend`` and ``NotImplementedError`` for ``"triton"``/``"xformers"`` (:func:`not_supported_reasons`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm SwinTransformerV2), got {type(model).__name__}")
    backend = _refuse_unsupported(backend)
    found = list(_iter_window_attention_v2(model))
    if not found:
        raise ValueError(
            f"model: no timm.models.swin_transformer_v2.WindowAttention found in {type(model).__name__} "
            "(expected a timm SwinTransformerV2 or simmim_fast's SwinV2 encoder)"
        )
    for parent, name, child in found:
        if isinstance(child, WindowAttentionV2):
            child.backend = backend
        else:
            setattr(parent, name, WindowAttentionV2.from_timm(child, backend=backend))
    return model
