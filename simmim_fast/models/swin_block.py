"""A timm ``SwinTransformerBlock`` whose attention path can run as one fused Triton op.

:class:`SwinBlock` adds no parameter, buffer or attribute to timm's block: :func:`~simmim_fast.models.
window_attention.swap_window_attention` turns every block that is exactly timm's ``SwinTransformerBlock``
into one in place (its class only), so ``state_dict`` keys, hooks and references stay. Its ``_attn``
(``norm1`` output ``(B, H, W, C)`` -> ``proj`` output ``(B, H, W, C)``) asks the block's window attention
whether the Triton kernel runs (:meth:`~simmim_fast.models.window_attention.WindowAttention.uses_triton`:
``backend="triton"``, or ``"auto"`` on CUDA when the kernel supports the input); then the roll, the
padding of the shifted grid, the window partition, the window reverse and the reverse roll are gone
from the block (:meth:`~simmim_fast.models.window_attention.WindowAttention.forward_tokens`: qkv GEMM
on the tokens, one kernel, proj GEMM). Otherwise it is timm's ``_attn``, unchanged.
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformerBlock

from .window_attention import WindowAttention

__all__ = ["SwinBlock"]


class SwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` with a fused attention path (see the module docstring).

    Equivalent PyTorch: timm's ``SwinTransformerBlock`` (same constructor, same forward).
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if isinstance(attn, WindowAttention):
            B, H, W, _ = x.shape
            wh, ww = self.window_size
            shape = (B, -(-H // wh) * wh, -(-W // ww) * ww, attn.qkv.weight.shape[0])
            if attn.uses_triton(x, qkv_shape=shape, window_size=(wh, ww), shift_size=tuple(self.shift_size),
                                resolution=(H, W)):
                return attn.forward_tokens(x, (wh, ww), tuple(self.shift_size))
        return super()._attn(x)
