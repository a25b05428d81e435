"""simmim-fast: SimMIM masked image modeling with fused kernels and a PyTorch reference path.

Public API (see shared ARCHITECTURE note):
    MaskGenerator, avg_dist          masking (official semantics + ablation strategies)
    create_model, PRESETS            SimMIM models of the official configs
    ops                              mask_token_fill, pixel_shuffle_head, masked_l1_loss
    swap_window_attention            our window attention in a timm Swin

The names are loaded on first use (PEP 562), so that ``python -m simmim_fast.train --help`` and the
CLIs' argument checks run without importing torch; ``from simmim_fast import ops`` etc. work as before.
"""
from __future__ import annotations

import importlib

__all__ = ["MaskGenerator", "avg_dist", "create_model", "PRESETS", "ops", "swap_window_attention"]
__version__ = "0.1.0"

_LAZY = {  # public name -> (module, attribute; None for the module itself)
    "ops": (".ops", None),
    "MaskGenerator": (".data.masking", "MaskGenerator"),
    "avg_dist": (".data.masking", "avg_dist"),
    "PRESETS": (".models", "PRESETS"),
    "create_model": (".models", "create_model"),
    "swap_window_attention": (".models.window_attention", "swap_window_attention"),
}


def __getattr__(name: str):
    if name not in _LAZY:  # submodules (train, finetune, ...) are then imported by the import system
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
